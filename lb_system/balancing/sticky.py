"""Sticky sessions, the policy half: the opaque id a cookie names a backend by.

The id is a keyed hash of the backend's name: it never shows an address, a forged or stale
value matches no backend, and it is the same in every balancer process and after a restart,
so several processes on one port (and a restarted one) keep their clients where they were."""

from __future__ import annotations

import hashlib

# Fixed, not secret: the id hides the address, it does not authenticate (a client may only pin
# itself to a backend it could reach anyway).
_KEY = b"lb_system sticky v1"


def sticky_id(backend_name: str) -> str:
    """The cookie value naming `backend_name`: 24 hex digits."""
    return hashlib.blake2b(backend_name.encode(), key=_KEY, digest_size=12).hexdigest()
