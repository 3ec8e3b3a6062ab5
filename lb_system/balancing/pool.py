"""The backends, their health state and counters, and which one gets the next request.

Pure policy: no sockets here. The health checker and the proxy report what they saw;
the pool decides when a backend is up or down.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lb_system.balancing.checks import backend_check_settings
from lb_system.balancing.events import Observers, Transition
from lb_system.balancing.sticky import sticky_id
from lb_system.balancing.strategies import Strategy, make_strategy
from lb_system.config import DEFAULT_POOL, BackendConfig, HealthConfig, PoolConfig
from lb_system.timestamps import iso_utc_or_none

ENABLED, DISABLED, DRAINING = "enabled", "disabled", "draining"
ADMIN_STATES = (ENABLED, DISABLED, DRAINING)


@dataclass(eq=False)
class Backend:
    """One upstream server and everything known about it."""

    name: str
    url: str
    hosted: bool
    weight: int = 1
    # Serves only while no primary of its set does (HAProxy's and nginx's `backup`).
    backup: bool = False
    # Its own check path instead of the set's [health] path; None: the set's.
    health_path: str | None = None
    pool: str = DEFAULT_POOL  # the name of the pool it is in (set by Pools, its owner)
    healthy: bool = False
    admin_state: str = ENABLED
    checked: bool = False
    last_check: float | None = None
    last_check_ms: float | None = None
    last_check_status: str | None = None
    last_error: str | None = None
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    passive_failures: int = 0
    checks_ok: int = 0
    checks_failed: int = 0
    ejections: int = 0
    # Passive ejection: out of rotation until this time whatever the checks say; None when not ejected.
    ejected_until: float | None = None
    # Consecutive ejections (lowered by time spent in service): the exponent of the ejection time.
    ejection_streak: int = 0
    requests: int = 0
    active_requests: int = 0
    state_since: float = field(default_factory=time.time)
    # Time spent down before the current state began; the current stretch is added on read.
    past_downtime: float = 0.0
    transitions: deque[Transition] = field(default_factory=lambda: deque(maxlen=10))
    # Set by `enable` and by an address change: no traffic until a good check on the (new) address.
    awaiting_check: bool = False
    # When a draining backend's last in-flight request finished; None while requests remain.
    drained_at: float | None = None
    # Hosted backends: whether the listening socket is open (admin stop/start); None for outside ones.
    listening: bool | None = None
    # Slow start: when its ramp to full weight began (None: at full weight) and how many seconds it lasts.
    ramp_start: float | None = None
    ramp_seconds: float = 0.0
    # Added to a running pool: its first good check starts a ramp (a backend there from the start does not ramp).
    ramp_on_up: bool = False
    # What a sticky-session cookie says to name it (never its address).
    sticky_id: str = field(init=False)

    def __post_init__(self) -> None:
        self.sticky_id = sticky_id(self.name)

    def effective_weight(self, now: float) -> float:
        """Its weight now: from 10% to 100% of `weight`, linearly over a slow start's ramp; `weight` outside one."""
        start = self.ramp_start
        if start is None or now - start >= self.ramp_seconds:
            return float(self.weight)
        return self.weight * (0.1 + 0.9 * max(0.0, now - start) / self.ramp_seconds)

    @property
    def eligible(self) -> bool:
        # BackendPool.choose inlines this rule for a request's first try.
        return self.healthy and self.admin_state == ENABLED and not self.awaiting_check

    @property
    def serving(self) -> bool:
        """Gets new requests: up, enabled (not disabled or draining) and past its first good check.
        A retiring backend is no longer in the pool, so nothing chooses it (its status says false)."""
        return self.eligible

    def downtime_s(self, now: float) -> float:
        """Total seconds spent down since the first check, the current stretch included."""
        current = max(0.0, now - self.state_since) if self.checked and not self.healthy else 0.0
        return round(self.past_downtime + current, 3)

    def status_dict(self, now: float | None = None) -> dict[str, object]:
        now = time.time() if now is None else now
        return {
            "name": self.name,
            "url": self.url,
            "hosted": self.hosted,
            "healthy": self.healthy,
            "serving": self.serving,
            "admin_state": self.admin_state,
            "weight": self.weight,
            "effective_weight": round(self.effective_weight(now), 2),
            "backup": self.backup,
            "last_check": iso_utc_or_none(self.last_check),
            "last_check_ms": self.last_check_ms,
            "last_check_status": self.last_check_status,
            # Seconds since the last check: a stalled checker shows here.
            "last_check_age_s": None if self.last_check is None else round(max(0.0, now - self.last_check), 3),
            "consecutive_failures": self.consecutive_failures,
            "last_error": self.last_error,
            "requests": self.requests,
            "active_requests": self.active_requests,
            "drained_at": iso_utc_or_none(self.drained_at),
            "awaiting_check": self.awaiting_check,
            "listening": self.listening,
            "checks_ok": self.checks_ok,
            "checks_failed": self.checks_failed,
            "ejections": self.ejections,
            "ejected_until": iso_utc_or_none(self.ejected_until),
            "state_since": iso_utc_or_none(self.state_since),
            "downtime_s": self.downtime_s(now),
            "transitions": [t.as_dict() for t in reversed(self.transitions)],
        }


def new_backend(config: BackendConfig, url: str) -> Backend:
    """The backend for one [[backends]] entry, reached at `url`; a hosted one starts listening."""
    return Backend(
        name=config.name,
        url=url,
        hosted=config.hosted,
        weight=config.weight,
        backup=config.backup,
        health_path=config.health_path,
        pool=config.pool,
        listening=True if config.hosted else None,
    )


class BackendCounts:
    """How many of `backends` pass their checks and serve, and the health word they come to:
    for one pool, and for all of them (Pools)."""

    backends: list[Backend]

    @property
    def healthy_count(self) -> int:
        return sum(1 for b in self.backends if b.healthy)

    @property
    def serving_count(self) -> int:
        return sum(1 for b in self.backends if b.serving)

    def health_word(self) -> str:
        """ok when every configured backend serves, degraded when some do, unavailable when none does."""
        serving = self.serving_count
        if not serving:
            return "unavailable"
        return "ok" if serving == len(self.backends) else "degraded"


class BackendPool(BackendCounts):
    """One pool: its backends, their up/down state machine, and its balancing strategy.

    The pool owns its backends' state: everyone else reports through its methods (a try's start
    and end, checks, admin actions, membership changes) and only reads their fields. Which
    backend is in which pool is `Pools`' business."""

    def __init__(
        self,
        backends: Iterable[Backend],
        *,
        health: HealthConfig,
        strategy: str | Strategy = "round_robin",
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.time,
        name: str = DEFAULT_POOL,
        hash_on: str | None = None,
        sticky_cookie: str | None = None,
    ) -> None:
        self.name = name
        self.backends: list[Backend] = list(backends)
        # The cookie that pins a client to a backend (the forwarder reads and sets it); None: no pinning.
        self.sticky_cookie = sticky_cookie
        self._has_backups = any(b.backup for b in self.backends)
        self.health = health
        # The consistent-hash key of a request (`[balancer] hash_on`); None with any other strategy.
        self.hash_on = hash_on
        self.strategy: Strategy = make_strategy(strategy) if isinstance(strategy, str) else strategy
        self.strategy.set_backends(self.backends)
        self.logger = logger or logging.getLogger("lb_system.pool")
        self.clock = clock
        # Told of every transition; the balancer adds its observers here and shares it with the
        # checker and the forwarder, so all three events go through one guarded loop.
        self.observers = Observers(self.logger)
        # Removed from the config, finishing their in-flight requests: never chosen, still shown.
        self.retiring: list[Backend] = []
        # One per draining backend, set by the release() that ends its last request.
        self._drained: dict[Backend, asyncio.Event] = {}
        # Backends in a slow start's ramp: while there is one, strategies get their effective weights.
        self._ramping: list[Backend] = []

    @classmethod
    def from_config(cls, configs: Sequence[BackendConfig], urls: dict[str, str], **kwargs: Any) -> BackendPool:
        return cls([new_backend(c, urls[c.name]) for c in configs], **kwargs)

    def get(self, name: str) -> Backend | None:
        return next((b for b in self.backends if b.name == name), None)

    def set_backends(self, backends: Iterable[Backend]) -> None:
        """Replace the membership in one step (a reload); the strategy forgets removed names. A backend
        new to the pool ramps up from its first good check (slow start)."""
        known = set(self.backends)
        self.backends = list(backends)
        for backend in self.backends:
            if backend not in known and not backend.checked:
                backend.ramp_on_up = True
        self._has_backups = any(b.backup for b in self.backends)
        self.strategy.set_backends(self.backends)

    def set_strategy(self, strategy: str | Strategy) -> None:
        self.strategy = make_strategy(strategy) if isinstance(strategy, str) else strategy
        self.strategy.set_backends(self.backends)

    def set_health(self, health: HealthConfig) -> None:
        self.health = health

    def apply_settings(self, config: PoolConfig) -> None:
        """The pool's own settings (at start and on a reload): a changed strategy starts afresh."""
        if config.strategy != self.strategy.name:
            self.set_strategy(config.strategy)
        self.hash_on = config.hash_on if config.strategy == "consistent_hash" else None
        self.sticky_cookie = config.sticky_cookie
        self.set_health(config.health)

    def hand_over(self, backend: Backend, to: BackendPool) -> None:
        """`backend` moves to another pool (a reload): a drain or a slow start in progress goes with it."""
        event = self._drained.pop(backend, None)
        if event is not None:
            to._drained[backend] = event
        if backend in self._ramping:
            self._ramping.remove(backend)
            to._ramping.append(backend)

    # --- a try on a backend ----------------------------------------------------------

    def acquire(self, backend: Backend) -> None:
        """A try starts on `backend`: counted, and in flight until `release`."""
        backend.requests += 1
        backend.active_requests += 1

    def release(self, backend: Backend) -> None:
        """A try on `backend` ended; the last one out of a draining backend completes its drain."""
        backend.active_requests -= 1
        if backend.active_requests == 0 and backend.admin_state == DRAINING:
            self._mark_drained(backend)

    # --- membership and admin state --------------------------------------------------

    def set_weight(self, backend: Backend, weight: int) -> None:
        """A reloaded weight; the strategy sees it at the next `set_backends`."""
        backend.weight = weight

    def configure(self, backend: Backend, config: BackendConfig) -> None:
        """A kept backend's reloaded settings (weight, backup, health_path); its address goes through `move`."""
        self.set_weight(backend, config.weight)
        backend.backup = config.backup
        backend.health_path = config.health_path
        self._has_backups = any(b.backup for b in self.backends)

    def check_settings(self, backend: Backend) -> HealthConfig:
        """What a check of `backend` asks and expects: the set's [health] with the backend's own path."""
        return backend_check_settings(self.health, backend.health_path)

    def move(self, backend: Backend, url: str, *, hosted: bool) -> None:
        """A new address (or hosted here instead of outside, or back): no traffic until a good check there."""
        backend.url, backend.hosted = url, hosted
        backend.listening = True if hosted else None
        backend.awaiting_check = True

    def set_listening(self, backend: Backend, listening: bool) -> None:
        """A hosted backend's listening socket was opened or closed."""
        backend.listening = listening

    def retire(self, backend: Backend) -> None:
        """Removed from the config (already out of `backends`): shown as draining until `forget`."""
        self.retiring.append(backend)
        self._begin_drain(backend)

    def forget(self, backend: Backend) -> None:
        """A retired backend is gone for good."""
        if backend in self.retiring:
            self.retiring.remove(backend)
        self._drained.pop(backend, None)

    def set_admin_state(self, backend: Backend, state: str) -> bool:
        """enabled / disabled / draining; False when it already was. Enabling waits for a good check."""
        if state not in ADMIN_STATES:
            raise ValueError(f"unknown admin state {state!r}")
        if backend.admin_state == state:
            return False
        self.logger.info("backend admin state", extra={"fields": {"backend": backend.name, "state": state}})
        if state == DRAINING:
            self._begin_drain(backend)
            return True
        backend.admin_state = state
        backend.drained_at = None
        self._drained.pop(backend, None)
        if state == ENABLED:
            backend.awaiting_check = True
        return True

    async def wait_drained(self, backend: Backend, timeout: float | None = None) -> bool:
        """Wait until a draining backend has no request in flight; False (and the drain no longer
        awaited) when `timeout` seconds passed first."""
        event = self._drained.get(backend)
        if event is None:
            return True
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
        except TimeoutError:
            self._drained.pop(backend, None)
            return False
        return True

    def _begin_drain(self, backend: Backend) -> None:
        backend.admin_state = DRAINING
        backend.drained_at = None
        self._drained[backend] = asyncio.Event()
        if backend.active_requests == 0:
            self._mark_drained(backend)

    def _mark_drained(self, backend: Backend) -> None:
        event = self._drained.get(backend)
        if event is None or event.is_set():
            return  # not draining any more, or its drain timed out
        backend.drained_at = self.clock()
        event.set()
        self.logger.info("backend drained", extra={"fields": {"backend": backend.name}})

    def _candidates(self, exclude: Sequence[Backend]) -> list[Backend]:
        """The backends a try may go to: serving and not yet tried. Backups only while no primary
        serves (tried or not, as HAProxy and nginx do: a retry goes to another primary)."""
        if self._has_backups:
            serving = [b for b in self.backends if b.eligible]
            primaries = [b for b in serving if not b.backup]
            return [b for b in (primaries or serving) if b not in exclude]
        return [b for b in self.backends if b.eligible and b not in exclude]

    def choose(self, key: str | None = None, exclude: Sequence[Backend] = (), pinned: str | None = None) -> Backend | None:
        """The backend for the next try of a request, never one it already tried; None when none is left.
        `pinned` (a sticky cookie's value) picks the backend it names while that one may take the try."""
        if self._has_backups:
            candidates = self._candidates(exclude)
        elif exclude:
            candidates = [b for b in self.backends if b.eligible and b not in exclude]
        else:  # a request's first try: the usual case, `eligible` inlined (a property call per backend)
            candidates = [b for b in self.backends if b.healthy and b.admin_state == ENABLED and not b.awaiting_check]
        if not candidates:
            return None
        if pinned is not None:
            for backend in candidates:
                if backend.sticky_id == pinned:
                    return backend
        if self._ramping:
            return self.strategy.choose(candidates, key, self._ramp_weights())
        return self.strategy.choose(candidates, key)

    def _ramp_weights(self) -> Callable[[Backend], float] | None:
        """The effective-weight function for this pick; ramps that are over are dropped first."""
        now = self.clock()
        for backend in [b for b in self._ramping if b.ramp_start is None or now - b.ramp_start >= b.ramp_seconds]:
            backend.ramp_start = None
            self._ramping.remove(backend)
        if not self._ramping:
            return None
        return lambda backend: backend.effective_weight(now)

    def _start_ramp(self, backend: Backend, now: float) -> None:
        """Back in service (or new): from 10% of its weight to all of it over `slow_start` seconds."""
        backend.ramp_on_up = False
        seconds = self.health.slow_start
        if seconds <= 0:
            return
        backend.ramp_start, backend.ramp_seconds = now, seconds
        if backend not in self._ramping:
            self._ramping.append(backend)

    def has_candidate(self, exclude: Sequence[Backend] = ()) -> bool:
        """Whether a further try could go anywhere (without advancing the strategy)."""
        if self._has_backups:
            return bool(self._candidates(exclude))
        return any(b.eligible and b not in exclude for b in self.backends)

    # --- what the health checker saw -------------------------------------------------

    def record_check(self, backend: Backend, ok: bool, status: str, duration_ms: float | None, error: str | None = None) -> None:
        """One active check: `fall` failures in a row take it down, `rise` successes bring it up.
        The very first check sets the state directly. An ejected backend's good checks count
        only once its ejection time is over. Checks never touch the count of proxied failures.
        `error` says why a failed check failed when `status` alone does not (a wrong status or body)."""
        now = self.clock()
        was_serving, was_checked = backend.serving, backend.checked
        backend.last_check = now
        backend.last_check_ms = None if duration_ms is None else round(duration_ms, 2)
        backend.last_check_status = status
        if ok:
            backend.checks_ok += 1
            backend.consecutive_failures = 0
            backend.last_error = None
            backend.awaiting_check = False
            if backend.ejected_until is not None and now < backend.ejected_until:
                backend.consecutive_successes = 0
            else:
                backend.ejected_until = None
                backend.consecutive_successes += 1
            if not backend.checked or (not backend.healthy and backend.consecutive_successes >= self.health.rise):
                self._transition(backend, up=True, reason="health check passed")
        else:
            backend.checks_failed += 1
            backend.consecutive_failures += 1
            backend.consecutive_successes = 0
            backend.last_error = error or status
            if not backend.checked or (backend.healthy and backend.consecutive_failures >= self.health.fall):
                self._transition(backend, up=False, reason=f"health check failed: {backend.last_error}")
        backend.checked = True
        if backend.serving and not was_serving and (was_checked or backend.ramp_on_up):
            self._start_ramp(backend, now)  # back up, enabled again, moved, or added to a running pool

    # --- what the proxy saw ----------------------------------------------------------

    def record_passive_failure(self, backend: Backend, reason: str) -> None:
        """A proxied request failed on this backend (no answer, a cut answer, or a 5xx when
        `passive_5xx`). `passive_fall` such failures in a row eject it, within `max_ejection_percent`."""
        backend.passive_failures += 1
        backend.last_error = reason
        if not backend.healthy or self.health.passive_fall == 0 or backend.passive_failures < self.health.passive_fall:
            return
        if self._may_eject():
            self._eject(backend, reason)

    def record_passive_success(self, backend: Backend) -> None:
        """A proxied request got a whole answer: the only thing that resets the count of proxied failures."""
        backend.passive_failures = 0

    def _eject(self, backend: Backend, reason: str) -> None:
        """Out for `ejection_time`, doubled for each consecutive ejection up to `max_ejection_time`;
        then back after `rise` good checks.

        After Envoy's outlier detection (envoyproxy.io, api/envoy/config/cluster/v3/outlier_detection.proto:
        base_ejection_time, max_ejection_time, max_ejection_percent; arch_overview/upstream/outlier):
        passive ejection independent of active checks, and the ejection multiplier lowered by one
        for each base ejection time the host stayed in service. We double where Envoy multiplies."""
        health, now = self.health, self.clock()
        in_service = max(0.0, now - backend.state_since)  # up since: the backend is healthy here
        backend.ejection_streak = max(0, backend.ejection_streak - int(in_service // health.ejection_time)) + 1
        exponent = min(backend.ejection_streak - 1, 32)  # 2**32 x any base is past any cap
        duration = min(health.ejection_time * 2**exponent, health.max_ejection_time)
        backend.ejected_until = now + duration
        backend.ejections += 1
        failures, backend.passive_failures = backend.passive_failures, 0
        backend.consecutive_successes = 0
        self._transition(backend, up=False, reason=f"ejected for {duration:g}s after {failures} failed requests: {reason}")

    def _may_eject(self) -> bool:
        total = len(self.backends)
        down_after = sum(1 for b in self.backends if not b.healthy) + 1
        still_eligible = sum(1 for b in self.backends if b.eligible) - 1
        cap = math.floor(total * self.health.max_ejection_percent / 100)
        return down_after <= cap and still_eligible >= 1

    def _transition(self, backend: Backend, *, up: bool, reason: str) -> None:
        first = not backend.checked
        changed = backend.healthy != up
        backend.healthy = up
        if not changed and not first:
            return
        now = self.clock()
        if changed and up and not first:
            backend.past_downtime += max(0.0, now - backend.state_since)
        if changed or first:
            # The first check is a transition too: the state it sets starts now.
            backend.state_since = now
        transition = Transition(at=now, to="up" if up else "down", reason=reason)
        backend.transitions.append(transition)
        if up:
            self.logger.info("backend up", extra={"fields": {"backend": backend.name, "reason": reason}})
        else:
            self.logger.warning("backend down", extra={"fields": {"backend": backend.name, "reason": reason}})
        self.observers.on_transition(backend.name, transition)
