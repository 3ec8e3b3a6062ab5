"""Every named pool of backends, which backend is in which, and the routes that pick a pool.

Pure policy: no sockets here. A request is routed to one pool (`route`); its tries, retries and
"no healthy backend" all stay within that pool. The registry is also the whole-system view the
status pages read: every backend, every retiring one, and one health word over all of them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

from lb_system.balancing.events import Observers
from lb_system.balancing.pool import Backend, BackendCounts, BackendPool, new_backend
from lb_system.balancing.routes import Route, RouteTable
from lb_system.config import DEFAULT_POOL, Config, HealthConfig, PoolConfig

__all__ = ["Pools"]


class Pools(BackendCounts):
    """The named pools (`[pools.NAME]`, and every pool a backend names), and the route table.

    The one owner of pool membership: it sets `Backend.pool` and moves a backend between pools
    on a reload, keeping its state. Every pool shares one `Observers` and one clock."""

    def __init__(
        self,
        pools: Mapping[str, PoolConfig],
        backends: Iterable[Backend] = (),
        *,
        routes: RouteTable | None = None,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.logger = logger or logging.getLogger("lb_system.pool")
        self.clock = clock
        self.observers = Observers(self.logger)
        self.routes = routes or RouteTable()
        self._pools: dict[str, BackendPool] = {}
        self.backends: list[Backend] = []
        self.routed = False
        self._configured: tuple[str, ...] = ()
        backends = list(backends)
        # Made with their first members: a backend there from the start does not slow-start.
        for name, config in pools.items():
            self._new_pool(name, config, [b for b in backends if b.pool == name])
        self.assign(pools, [(b, b.pool) for b in backends], routes=self.routes)

    @classmethod
    def from_config(
        cls,
        config: Config,
        urls: Mapping[str, str],
        *,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.time,
    ) -> Pools:
        """The pools of a config, each backend reached at `urls[name]`."""
        backends = [new_backend(c, urls[c.name]) for c in config.backends]
        return cls(config.pools, backends, routes=RouteTable.from_config(config.routes), logger=logger, clock=clock)

    @classmethod
    def around(cls, pool: BackendPool) -> Pools:
        """A registry of one pool made alone, as the default pool (for callers that hold only a BackendPool)."""
        pools = cls({}, pool.backends, logger=pool.logger, clock=pool.clock)
        pools.observers = pool.observers
        pools._pools = {DEFAULT_POOL: pool}
        pools._configured = (DEFAULT_POOL,)
        return pools

    # --- reading ------------------------------------------------------------------------

    def __getitem__(self, name: str) -> BackendPool:
        return self._pools[name]

    def __iter__(self) -> Iterator[BackendPool]:
        """The configured pools, in config order ("default" first). An empty default pool is left out
        when routes send every request elsewhere: it serves nothing, so it is not "unavailable"."""
        pools = (self._pools[name] for name in self._configured)
        return (pool for pool in pools if pool.backends or pool.retiring or pool.name != DEFAULT_POOL or not self.routed)

    def get(self, name: str) -> Backend | None:
        """The backend of that name, in whichever pool."""
        return next((b for b in self.backends if b.name == name), None)

    def pool_of(self, backend: Backend) -> BackendPool:
        """The pool `backend` is in (or retiring from)."""
        return self._pools[backend.pool]

    @property
    def retiring(self) -> list[Backend]:
        return [b for pool in self._pools.values() for b in pool.retiring]

    @property
    def default(self) -> BackendPool:
        return self._pools[DEFAULT_POOL]

    @property
    def health(self) -> HealthConfig:
        """The default pool's checks: `[health]` unless `[pools.default.health]` says otherwise."""
        return self.default.health

    # --- routing --------------------------------------------------------------------------

    def route(self, host: str | None, path: str) -> tuple[BackendPool | None, Route | None]:
        """The pool for a request to `host` and `path` (resolved) and the route that chose it.
        No route matched: the default pool, while it has backends (or no pool has any, where
        the answer is the usual 503); otherwise (None, None), a 404."""
        route = self.routes.match(host, path) if self.routes else None
        if route is not None:
            return self._pools[route.pool], route
        default = self._pools[DEFAULT_POOL]
        if default.backends or not self.backends:
            return default, None
        return None, None

    # --- membership ---------------------------------------------------------------------

    def assign(
        self,
        pools: Mapping[str, PoolConfig],
        members: Sequence[tuple[Backend, str]],
        *,
        routes: RouteTable,
        removed: Iterable[Backend] = (),
    ) -> None:
        """Apply a config's pools and membership in one step (start-up and every reload): each
        pool takes its settings, each backend (the same object when it stays, so its state
        carries over) goes to the pool named beside it, in config order; `removed` ones retire."""
        for name, config in pools.items():
            pool = self._pools.get(name) or self._new_pool(name, config, [])
            pool.apply_settings(config)
        for backend in removed:
            self.pool_of(backend).retire(backend)
        for backend, name in members:
            if backend.pool != name and backend.pool in self._pools:
                self._pools[backend.pool].hand_over(backend, self._pools[name])
            backend.pool = name
        backends = [backend for backend, _ in members]
        for name, pool in self._pools.items():
            pool.set_backends([b for b in backends if b.pool == name])
        self.backends = backends
        self.routes = routes
        # Whether requests are sorted into pools at all (routes, or a backend outside "default"):
        # only then do the access line, the metrics and /health name pools. Read per request.
        self.routed = bool(routes) or any(b.pool != DEFAULT_POOL for b in backends)
        self._configured = tuple(pools)
        self._drop_unused()

    def _new_pool(self, name: str, config: PoolConfig, backends: list[Backend]) -> BackendPool:
        pool = self._pools[name] = BackendPool(
            backends, health=config.health, strategy=config.strategy, logger=self.logger, clock=self.clock, name=name
        )
        pool.observers = self.observers
        return pool

    def retire(self, backend: Backend) -> None:
        """Shown as draining until `forget` (see BackendPool.retire)."""
        self.pool_of(backend).retire(backend)

    def forget(self, backend: Backend) -> None:
        """A retired backend is gone for good; a pool no longer configured goes with its last one."""
        self.pool_of(backend).forget(backend)
        self._drop_unused()

    def _drop_unused(self) -> None:
        for name in [n for n, pool in self._pools.items() if n not in self._configured and not pool.retiring]:
            del self._pools[name]
