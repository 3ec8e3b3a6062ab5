"""Load-balancing strategies: pure policy objects that pick one backend.

A strategy never opens sockets or looks at health; the pool hands it the
backends eligible right now (up, enabled, not yet tried by this request) in
stable config order, and it answers with one of them.

While a backend ramps up after a slow start, the pool also hands each pick a
weight function (`weigh`: a backend's effective weight now); without one, a
backend weighs its configured `weight`. Every strategy uses it where it uses
weights.
"""

from __future__ import annotations

import bisect
import hashlib
import random
import struct
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, TypeVar

from lb_system.config import STRATEGY_NAMES, validate_hash_on

__all__ = [
    "STRATEGY_NAMES",
    "BackendView",
    "ConsistentHash",
    "LeastConnections",
    "PowerOfTwo",
    "RandomChoice",
    "RoundRobin",
    "Strategy",
    "hash_key",
    "make_strategy",
    "validate_hash_on",
]


class BackendView(Protocol):
    """What a strategy may see of a backend."""

    name: str  # unique
    weight: int  # 1..100
    active_requests: int


B = TypeVar("B", bound=BackendView)
# A backend's effective weight for this pick (slow start); None: its configured weight.
Weigh = Callable[[B], float]


class Strategy(Protocol):
    """Common interface of all strategies."""

    name: str  # the config word

    def choose(self, candidates: Sequence[B], key: str | None = None, weigh: Weigh[B] | None = None) -> B | None:
        """Pick one of `candidates` (stable config order), by their effective weights when `weigh`
        is given; None when empty."""
        ...

    def set_backends(self, all_backends: Sequence[BackendView]) -> None:
        """Tell the strategy the full backend set (called on membership change)."""
        ...


class RoundRobin:
    """Smooth weighted round robin, as nginx does it.

    Each pick adds every candidate's weight to its current value, picks the
    highest (first in order on ties) and subtracts the candidates' total
    weight from it. Weights 5:1:1 give a, a, b, a, c, a, a; equal weights
    give plain round robin in config order.

    A backend missing from `candidates` (down, or already tried by this
    request) keeps its current value frozen, as nginx skips such peers, so a
    retry or a short outage does not disturb the others' rhythm. State of a
    name absent from the last `set_backends` call, or unseen for at least
    `forget_after` picks (swept every `forget_after` picks), is dropped so
    removed backends cannot pile up.
    """

    name = "round_robin"

    def __init__(self, *, forget_after: int = 1024) -> None:
        if forget_after < 1:
            raise ValueError(f"forget_after must be >= 1, got {forget_after}")
        self._forget_after = forget_after
        self._current: dict[str, float] = {}
        self._last_seen: dict[str, int] = {}
        self._picks = 0

    def set_backends(self, all_backends: Sequence[BackendView]) -> None:
        """Drop the state of backends no longer configured."""
        keep = {b.name for b in all_backends}
        for name in [n for n in self._current if n not in keep]:
            del self._current[name]
            del self._last_seen[name]

    def choose(self, candidates: Sequence[B], key: str | None = None, weigh: Weigh[B] | None = None) -> B | None:
        """Pick the next backend in the smooth weighted sequence; `key` is ignored."""
        if not candidates:
            return None
        self._picks = picks = self._picks + 1
        current, last_seen = self._current, self._last_seen
        total: float = 0
        best: B | None = None
        best_value: float = 0
        for backend in candidates:
            name = backend.name
            weight = backend.weight if weigh is None else weigh(backend)
            value = current.get(name, 0) + weight
            current[name] = value
            last_seen[name] = picks
            total += weight
            if best is None or value > best_value:
                best, best_value = backend, value
        assert best is not None
        current[best.name] = best_value - total
        if picks % self._forget_after == 0:
            self._forget_stale()
        return best

    def _forget_stale(self) -> None:
        horizon = self._picks - self._forget_after
        for name in [n for n, seen in self._last_seen.items() if seen <= horizon]:
            del self._current[name]
            del self._last_seen[name]


class LeastConnections:
    """Lowest active_requests / weight wins.

    Ties rotate: the pick is the first tied backend after the previously
    chosen one in candidate order (wrapping; the first tied one if that
    backend is no longer a candidate), so an idle pool is served round
    robin rather than always by the first backend. With effective weights
    (a slow start's ramp), load is measured against them and ties go by
    smooth weighted round robin, as nginx's least_conn breaks them, so a
    ramping backend gets its share of an idle pool too.
    """

    name = "least_connections"

    def __init__(self) -> None:
        self._last: str | None = None
        self._ties = RoundRobin()

    def set_backends(self, all_backends: Sequence[BackendView]) -> None:
        """No-op: this strategy needs only the candidates."""

    def choose(self, candidates: Sequence[B], key: str | None = None, weigh: Weigh[B] | None = None) -> B | None:
        """Pick the least loaded backend relative to its weight; `key` is ignored."""
        if not candidates:
            return None
        if weigh is not None:
            return self._choose_weighed(candidates, weigh)
        tied: list[tuple[int, B]] = []
        best: B | None = None
        last_position = -1
        for position, backend in enumerate(candidates):
            if backend.name == self._last:
                last_position = position
            # Cross-multiplied to compare active/weight exactly, without floats.
            if best is None or (backend.active_requests * best.weight < best.active_requests * backend.weight):
                best, tied = backend, [(position, backend)]
            elif backend.active_requests * best.weight == best.active_requests * backend.weight:
                tied.append((position, backend))
        chosen = next((b for p, b in tied if p > last_position), tied[0][1])
        self._last = chosen.name
        return chosen

    def _choose_weighed(self, candidates: Sequence[B], weigh: Weigh[B]) -> B:
        loads = [(backend.active_requests / weigh(backend), backend) for backend in candidates]
        lowest = min(load for load, _ in loads)
        tied = [backend for load, backend in loads if load == lowest]
        chosen = tied[0] if len(tied) == 1 else self._ties.choose(tied, weigh=weigh)
        assert chosen is not None
        self._last = chosen.name
        return chosen


class _Randomized:
    """Shared by the strategies that draw at random: an injectable rng, no membership state."""

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()

    def set_backends(self, all_backends: Sequence[BackendView]) -> None:
        """No-op: this strategy needs only the candidates."""


class PowerOfTwo(_Randomized):
    """Power of two choices.

    Draws two distinct candidates, each draw weighted by `weight` (sampling
    without replacement), and returns the one with fewer active_requests;
    on a tie the first drawn wins, so an idle pool is served in proportion
    to the weights. With effective weights (a slow start's ramp) the draws
    use them, and the two compare active_requests per effective weight, so
    a ramping backend is not handed load just for being idle.
    """

    name = "power_of_two"

    def choose(self, candidates: Sequence[B], key: str | None = None, weigh: Weigh[B] | None = None) -> B | None:
        """Pick the less busy of two weighted random draws; `key` is ignored."""
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        choices = self._rng.choices
        weights = [b.weight for b in candidates] if weigh is None else [weigh(b) for b in candidates]
        first_index = choices(range(len(candidates)), weights=weights)[0]
        rest = [i for i in range(len(candidates)) if i != first_index]
        second_index = rest[0] if len(rest) == 1 else choices(rest, weights=[weights[i] for i in rest])[0]
        first, second = candidates[first_index], candidates[second_index]
        if weigh is None:
            return second if second.active_requests < first.active_requests else first
        # Cross-multiplied: second's load per weight below first's.
        less_busy = second.active_requests * weights[first_index] < first.active_requests * weights[second_index]
        return second if less_busy else first


class RandomChoice(_Randomized):
    """Random pick weighted by `weight`."""

    name = "random"

    def choose(self, candidates: Sequence[B], key: str | None = None, weigh: Weigh[B] | None = None) -> B | None:
        """Pick a backend with probability proportional to its (effective) weight; `key` is ignored."""
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        weights = [b.weight for b in candidates] if weigh is None else [weigh(b) for b in candidates]
        return self._rng.choices(candidates, weights=weights)[0]


_EIGHT_U64 = struct.Struct(">8Q")


def _key_point(key: str) -> int:
    """Ring position of a request key (stable across processes, unlike hash())."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def _key_share(key: str, owner: str) -> float:
    """Where a key stands, in [0, 1), in its owner's ramp: it goes to the ramping owner once the
    ramp's fraction passes it, and stays there as the ramp grows."""
    digest = hashlib.blake2b(key.encode() + b"\0" + owner.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class _Ring:
    """Sorted virtual-node positions and the backend name owning each."""

    __slots__ = ("points", "owners")

    def __init__(self, members: tuple[tuple[str, int], ...], points_per_weight: int) -> None:
        pairs: list[tuple[int, str]] = []
        for name, weight in members:
            count = points_per_weight * max(1, weight)
            prefix = name.encode() + b"#"
            positions: list[int] = []
            # One 64-byte digest yields eight positions (ketama takes four from md5).
            for i in range(-(-count // 8)):
                positions.extend(_EIGHT_U64.unpack(hashlib.blake2b(prefix + str(i).encode()).digest()))
            pairs.extend((p, name) for p in positions[:count])
        pairs.sort()
        self.points = [p for p, _ in pairs]
        self.owners = [n for _, n in pairs]

    def walk(self, point: int, allowed: Mapping[str, object]) -> str | None:
        """First owner clockwise from `point` whose name is in `allowed`."""
        start = bisect.bisect_left(self.points, point)
        owners = self.owners
        for index in range(start, len(owners)):
            if owners[index] in allowed:
                return owners[index]
        for index in range(start):
            if owners[index] in allowed:
                return owners[index]
        return None

    def walk_ramped(self, point: int, allowed: Mapping[str, object], key: str, ramp: Mapping[str, float]) -> str | None:
        """`walk`, where an owner in `ramp` (its fraction of full weight) takes only that share of its keys."""
        start = bisect.bisect_left(self.points, point)
        owners = self.owners
        for index in (*range(start, len(owners)), *range(start)):
            owner: str = owners[index]
            if owner in allowed and (owner not in ramp or _key_share(key, owner) < ramp[owner]):
                return owner
        return self.walk(point, allowed)  # every candidate ramping and passing over this key: its owner


class ConsistentHash:
    """Hash ring with virtual nodes, weighted by `weight`.

    Each backend owns `points_per_weight * weight` positions, derived only
    from its own name, so adding or removing a backend moves only the keys
    it gains or loses. Above `max_points` in total the per-weight count
    shrinks to keep ring builds cheap (at the price of extra key movement
    when membership changes in such large pools).

    The ring is built over the full set given to `set_backends` (or over the
    candidates if it was never called) and cached by the sorted
    (name, weight) tuples it was built for. A key whose backend is not a
    candidate (down, or already tried) goes to the next backend clockwise
    that is one. A request without a key (None) is served by smooth
    weighted round robin, so keyless traffic still spreads.

    A backend in a slow start's ramp keeps its ring positions but takes only
    its ramp's fraction of the keys landing there (the others walk on
    clockwise); as the ramp grows, keys move to it and stay.
    """

    name = "consistent_hash"

    _CACHED_RINGS = 4  # the full set plus a few candidate-only variants

    def __init__(self, *, points_per_weight: int = 160, max_points: int = 160_000) -> None:
        if points_per_weight < 1 or max_points < 1:
            raise ValueError("points_per_weight and max_points must be >= 1")
        self._points_per_weight = points_per_weight
        self._max_points = max_points
        self._backends: tuple[BackendView, ...] | None = None
        self._rings: OrderedDict[tuple[tuple[str, int], ...], _Ring] = OrderedDict()
        self._fallback = RoundRobin()

    def set_backends(self, all_backends: Sequence[BackendView]) -> None:
        """Remember the full backend set the ring is built over."""
        self._backends = tuple(all_backends)
        self._fallback.set_backends(all_backends)

    def choose(self, candidates: Sequence[B], key: str | None = None, weigh: Weigh[B] | None = None) -> B | None:
        """Pick the candidate owning `key` on the ring (round robin when key is None)."""
        if not candidates:
            return None
        if key is None:
            return self._fallback.choose(candidates, weigh=weigh)
        by_name = {b.name: b for b in candidates}
        ring = self._ring_for(candidates)
        ramp = {} if weigh is None else {b.name: weigh(b) / b.weight for b in candidates if weigh(b) < b.weight}
        if ramp:
            owner = ring.walk_ramped(_key_point(key), by_name, key, ramp)
        else:
            owner = ring.walk(_key_point(key), by_name)
        # Every candidate is on the ring, so the walk always finds one.
        assert owner is not None
        return by_name[owner]

    def _ring_for(self, candidates: Sequence[BackendView]) -> _Ring:
        members = {b.name: b.weight for b in self._backends or ()}
        for b in candidates:
            # A candidate the pool never announced still has to be reachable.
            members.setdefault(b.name, b.weight)
        ring_key = tuple(sorted(members.items()))
        ring = self._rings.get(ring_key)
        if ring is None:
            total_weight = sum(max(1, w) for _, w in ring_key)
            per_weight = min(self._points_per_weight, max(1, self._max_points // total_weight))
            ring = self._rings[ring_key] = _Ring(ring_key, per_weight)
            while len(self._rings) > self._CACHED_RINGS:
                self._rings.popitem(last=False)
        else:
            self._rings.move_to_end(ring_key)
        return ring


def make_strategy(name: str, *, rng: random.Random | None = None) -> Strategy:
    """Build the strategy named by its config word; `rng` seeds the random ones."""
    if name == "round_robin":
        return RoundRobin()
    if name == "least_connections":
        return LeastConnections()
    if name == "power_of_two":
        return PowerOfTwo(rng=rng)
    if name == "random":
        return RandomChoice(rng=rng)
    if name == "consistent_hash":
        return ConsistentHash()
    raise ValueError(f"unknown strategy {name!r}; expected one of: {', '.join(STRATEGY_NAMES)}")


def hash_key(hash_on: str, *, client_ip: str, path: str, headers: Mapping[str, str]) -> str | None:
    """The consistent-hash key of a request, or None when the header is missing.

    Header names match case-insensitively whether or not `headers` does.
    """
    validate_hash_on(hash_on)
    if hash_on == "client_ip":
        return client_ip
    if hash_on == "path":
        return path
    header = hash_on[len("header:") :]
    value = headers.get(header)
    if value is not None:
        return value
    wanted = header.lower()
    for name, value in headers.items():
        if name.lower() == wanted:
            return value
    return None
