"""Routes: which pool a request goes to, by its Host and its path. Pure policy: no network.

An exact host beats a wildcard (`*.example.com`, the longer suffix first), which beats a route
with no host; within a tier the longest `path_prefix` wins, matched on whole segments. A tier
whose hosts match but whose prefixes do not leaves the request to the next tier.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import quote

from lb_system.config import RouteConfig

__all__ = ["UNROUTED", "Route", "RouteTable", "request_host"]

# How the access line and the error records name a request no route matched.
UNROUTED = "-"
# RFC 3986 pchar and "/": what a stripped, resolved path may keep unquoted.
_PATH_SAFE = "/:@!$&'()*+,;=-._~"


@dataclass(frozen=True, slots=True)
class Route:
    """One route: requests for `host` (None: any) under `path_prefix` go to `pool`."""

    pool: str
    host: str | None = None
    path_prefix: str = "/"
    strip_prefix: bool = False

    @classmethod
    def from_config(cls, config: RouteConfig) -> Route:
        return cls(config.pool, config.host, config.path_prefix, config.strip_prefix)

    @property
    def name(self) -> str:
        """`api.example.com/api`, `*.example.com/`, `/static`: as logs and records name it."""
        return f"{self.host or ''}{self.path_prefix}"

    def covers(self, path: str) -> bool:
        """Whether `path` is under the prefix, on whole segments: /api covers /api and /api/x, not /apix."""
        prefix = self.path_prefix
        if prefix == "/" or path == prefix:
            return True
        return path.startswith(prefix) and path[len(prefix) : len(prefix) + 1] == "/"

    def upstream_target(self, target: str, resolved: str) -> str:
        """The origin-form `target` as the pool's backends get it: with `strip_prefix`, the prefix
        taken off (`/api/items?x=1` -> `/items?x=1`, `/api` -> `/`). `resolved` is the path the
        route matched; it is used when the raw target spells the prefix otherwise (`/x/../api`)."""
        prefix = self.path_prefix
        if not self.strip_prefix or prefix == "/":
            return target
        path, mark, query = target.partition("?")
        if path == prefix or path.startswith(prefix + "/"):
            rest = path[len(prefix) :]
        else:
            rest = quote(resolved[len(prefix) :], safe=_PATH_SAFE)
        return (rest or "/") + mark + query


def request_host(host: str | None) -> str | None:
    """The Host header as routes match it: lower case, without its port or a trailing dot."""
    if not host:
        return None
    host = host.strip().lower()
    if host.startswith("["):  # an IPv6 literal keeps its brackets, loses its port
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    return host.partition(":")[0].rstrip(".") or None


def _longest_prefix_first(routes: Iterable[Route]) -> tuple[Route, ...]:
    return tuple(sorted(routes, key=lambda route: len(route.path_prefix), reverse=True))


class RouteTable:
    """Every route, indexed for matching: a dict per exact host, wildcards by suffix, then the rest."""

    def __init__(self, routes: Sequence[Route] = ()) -> None:
        self.routes = tuple(routes)
        exact: dict[str, list[Route]] = {}
        wildcard: dict[str, list[Route]] = {}
        for route in self.routes:
            if route.host is None:
                continue
            if route.host.startswith("*."):
                wildcard.setdefault(route.host[1:], []).append(route)  # ".example.com"
            else:
                exact.setdefault(route.host, []).append(route)
        self._exact = {host: _longest_prefix_first(group) for host, group in exact.items()}
        self._wildcard = tuple(
            (suffix, _longest_prefix_first(group))
            for suffix, group in sorted(wildcard.items(), key=lambda item: len(item[0]), reverse=True)
        )
        self._any_host = _longest_prefix_first(r for r in self.routes if r.host is None)

    @classmethod
    def from_config(cls, routes: Iterable[RouteConfig]) -> RouteTable:
        return cls([Route.from_config(route) for route in routes])

    def __bool__(self) -> bool:
        return bool(self.routes)

    def match(self, host: str | None, path: str) -> Route | None:
        """The route for a request to `host` (the Host header as sent) and `path` (resolved); None when none matches."""
        if not self.routes:
            return None
        name = request_host(host)
        if name is not None:
            route = self._first_covering(self._exact.get(name, ()), path)
            if route is not None:
                return route
            for suffix, group in self._wildcard:
                # One or more labels before the suffix: *.example.com matches a.example.com, a.b.example.com, not example.com.
                if len(name) > len(suffix) and name.endswith(suffix):
                    route = self._first_covering(group, path)
                    if route is not None:
                        return route
        return self._first_covering(self._any_host, path)

    @staticmethod
    def _first_covering(routes: Iterable[Route], path: str) -> Route | None:
        return next((route for route in routes if route.covers(path)), None)
