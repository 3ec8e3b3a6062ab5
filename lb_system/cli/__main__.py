"""`python -m lb_system.cli`: the command line, as `python run.py` (the --processes parent starts its children so)."""

import sys

from lb_system.cli.main import main

sys.exit(main())
