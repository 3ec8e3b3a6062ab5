"""Request targets: which the balancer forwards, in which form, and which paths stay its own.

RFC 9112 §3.2: an origin-form target (`/path?query`) is forwarded as it came. An absolute-form
target (`http://host/path`, what a client using the balancer as its HTTP proxy sends) is
forwarded in origin form, with Host taken from the target (§3.2.2). Authority-form (CONNECT),
asterisk-form (`OPTIONS *`) and any other target cannot be forwarded: 400, never a backend's
failure.

A path a backend would resolve (dot segments, percent-encoded dots and slashes, backslashes,
repeated slashes) to `/admin/...` or to one of the balancer's own endpoints is never forwarded.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote

from aiohttp import web

# scheme://authority[/path][?query][#fragment]; an authority with userinfo ("@") does not match.
_ABSOLUTE_FORM = re.compile(r"(?i)(https?)://([^/?#@\s]+)([/?#][^\s]*)?\Z")
CANNOT_FORWARD = "Request target cannot be forwarded: send /path, or http://host/path to a proxy"
OWN_PATH = "The path resolves to the balancer's own endpoint: not forwarded"


class TargetRefused(web.HTTPBadRequest):
    """A 400 for a target the balancer will not forward; `refusal_reason` names why in the access line."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(text=detail)
        self.refusal_reason = reason


def forwardable_form(method: str, target: str) -> bool:
    """Whether a request target is in a form the balancer forwards: origin-form or absolute-form."""
    return target.startswith("/") or (method != "CONNECT" and _ABSOLUTE_FORM.match(target) is not None)


def upstream_target(request: web.BaseRequest) -> tuple[str, str | None]:
    """(origin-form target to send upstream, Host to send instead of the client's, or None).
    Raises 400 for a target the balancer cannot forward."""
    raw = request.raw_path
    if raw.startswith("/"):
        return raw, None
    match = _ABSOLUTE_FORM.match(raw)
    if match is None or request.method == "CONNECT":
        raise TargetRefused("bad_target", CANNOT_FORWARD)
    rest = (match.group(3) or "").partition("#")[0]
    return (rest if rest.startswith("/") else "/" + rest), match.group(2)


def resolved_path(target: str) -> str:
    """The path of an origin-form target as a lenient backend could resolve it: percent-decoded
    (dots and slashes too), backslashes and repeated slashes as one slash, dot segments removed."""
    path = target.partition("?")[0]
    if not ("/." in path or "%" in path or "\\" in path or "//" in path):
        return path  # nothing to resolve: the common case
    path = unquote(path.replace("\\", "/")).replace("\\", "/")
    segments: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if segments:
                segments.pop()
        elif segment not in (".", ""):
            segments.append(segment)
    trailing = "/" if path.endswith(("/", "/.", "/..")) and segments else ""
    return "/" + "/".join(segments) + trailing


class OwnPaths:
    """The balancer's own paths, read from its router: exact routes (with their methods) and
    prefixes (sub-applications such as /admin)."""

    def __init__(self, resources: Iterable[web.AbstractResource], *, skip: str) -> None:
        self.methods: dict[str, set[str]] = {}
        prefixes: list[str] = []
        for resource in resources:
            canonical = resource.canonical
            if skip in canonical:
                continue  # the catch-all that forwards
            if isinstance(resource, web.PrefixedSubAppResource):
                prefixes.append(canonical.rstrip("/"))
            else:
                self.methods.setdefault(canonical, set()).update(route.method for route in resource)
        self.prefixes = tuple(prefixes)
        # First path segments of every own route ("" for "/"): a path starting otherwise can only reach the catch-all.
        self._first_segments = frozenset(path[1:].partition("/")[0] for path in (*self.methods, *self.prefixes))

    def routed_elsewhere(self, path: str) -> bool:
        """Whether the router could give `path` (as it matches it: `rel_url.path_safe`) to another
        route than the catch-all: its first segment is one of an own route's. Cheap and conservative."""
        return path[1:].partition("/")[0] in self._first_segments

    def owns(self, path: str) -> bool:
        """Whether `path` (resolved) is one of the balancer's endpoints or under one of its prefixes."""
        if not self.routed_elsewhere(path):
            return False  # the usual case, decided without the scan over prefixes
        if path in self.methods:
            return True
        return any(path == prefix or path.startswith(prefix + "/") for prefix in self.prefixes)

    def refuse(self, request: web.BaseRequest, target: str) -> None:
        """Raise 405 for a wrong method on an own endpoint, 400 for a path that only resolves to one."""
        path = resolved_path(target)
        if not self.owns(path):
            return
        if path == request.path and path in self.methods:
            raise web.HTTPMethodNotAllowed(request.method, sorted(self.methods[path]))
        raise TargetRefused("own_path", OWN_PATH)
