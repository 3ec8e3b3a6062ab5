"""Start lb_system: `python run.py` serves, `python run.py check` validates, `python run.py demo` provokes errors."""

import sys

from lb_system.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
