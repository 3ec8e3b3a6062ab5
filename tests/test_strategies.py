"""Unit tests for lb_system.balancing.strategies: pure policy, no network."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from lb_system.balancing.strategies import (
    STRATEGY_NAMES,
    ConsistentHash,
    LeastConnections,
    PowerOfTwo,
    RandomChoice,
    RoundRobin,
    Strategy,
    hash_key,
    make_strategy,
    validate_hash_on,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
KEYS = [f"user-{i}" for i in range(10_000)]


@dataclass
class Backend:
    name: str
    weight: int = 1
    active_requests: int = 0


def names(strategy: Strategy, candidates: Sequence[Backend], picks: int) -> str:
    """The names of `picks` consecutive choices, concatenated (names are one letter)."""
    out = []
    for _ in range(picks):
        chosen = strategy.choose(candidates)
        assert chosen is not None
        out.append(chosen.name)
    return "".join(out)


def owners(strategy: Strategy, candidates: Sequence[Backend], keys: Sequence[str]) -> dict[str, str]:
    result = {}
    for key in keys:
        chosen = strategy.choose(candidates, key)
        assert chosen is not None
        result[key] = chosen.name
    return result


def ring(backends: Sequence[Backend]) -> ConsistentHash:
    strategy = ConsistentHash()
    strategy.set_backends(backends)
    return strategy


# --- common interface -------------------------------------------------------


def test_make_strategy_builds_each_config_word_with_matching_name() -> None:
    for word in STRATEGY_NAMES:
        assert make_strategy(word, rng=random.Random(0)).name == word


def test_unknown_strategy_name_raises_value_error_listing_allowed_words() -> None:
    with pytest.raises(ValueError) as info:
        make_strategy("fastest")
    message = str(info.value)
    assert "fastest" in message
    for word in STRATEGY_NAMES:
        assert word in message


@pytest.mark.parametrize("word", STRATEGY_NAMES)
def test_every_strategy_returns_none_without_candidates(word: str) -> None:
    strategy = make_strategy(word, rng=random.Random(0))
    strategy.set_backends([Backend("a")])
    assert strategy.choose([], "key") is None
    assert strategy.choose([]) is None


@pytest.mark.parametrize("word", STRATEGY_NAMES)
def test_every_strategy_returns_the_only_candidate(word: str) -> None:
    strategy = make_strategy(word, rng=random.Random(0))
    strategy.set_backends([Backend("a"), Backend("b"), Backend("c")])
    only = Backend("b", active_requests=7)
    for key in ("k1", "k2", None):
        assert strategy.choose([only], key) is only


@pytest.mark.parametrize("word", STRATEGY_NAMES)
def test_every_strategy_only_returns_eligible_candidates(word: str) -> None:
    everyone = [Backend(n, weight=w) for n, w in zip("abcde", (1, 2, 3, 1, 5))]
    strategy = make_strategy(word, rng=random.Random(0))
    strategy.set_backends(everyone)
    eligible = [everyone[1], everyone[3]]
    for i in range(500):
        assert strategy.choose(eligible, f"k{i}") in eligible


# --- round_robin --------------------------------------------------------------


def test_round_robin_with_equal_weights_cycles_in_config_order() -> None:
    assert names(RoundRobin(), [Backend("a"), Backend("b"), Backend("c")], 9) == "abcabcabc"


def test_round_robin_weights_5_1_1_follow_the_nginx_sequence() -> None:
    backends = [Backend("a", 5), Backend("b"), Backend("c")]
    assert names(RoundRobin(), backends, 14) == "aabacaa" * 2


def test_round_robin_weights_3_to_1_interleave_as_a_a_b_a() -> None:
    assert names(RoundRobin(), [Backend("a", 3), Backend("b", 1)], 8) == "aaba" * 2


def test_round_robin_weights_2_to_1_never_send_three_in_a_row_to_the_heavy_one() -> None:
    sequence = names(RoundRobin(), [Backend("a", 2), Backend("b", 1)], 300)
    assert "aaa" not in sequence
    assert sequence.count("a") == 200


def test_weights_3_to_1_give_exactly_3_to_1_over_4k_picks() -> None:
    sequence = names(RoundRobin(), [Backend("a", 3), Backend("b", 1)], 400)
    for k in (1, 2, 5, 25):
        for start in range(len(sequence) - 4 * k + 1):
            window = sequence[start : start + 4 * k]
            assert window.count("a") == 3 * k, (k, start)


def test_round_robin_skips_a_tried_backend_and_keeps_the_stable_rhythm() -> None:
    a, b, c = Backend("a"), Backend("b"), Backend("c")
    strategy = RoundRobin()
    assert strategy.choose([a, b, c]) is a
    # The retry of that request must not go back to a.
    assert strategy.choose([b, c]) is b
    # Next requests see everyone again: a, frozen while skipped, waits one turn,
    # then the plain rotation resumes and nobody is starved.
    after = names(strategy, [a, b, c], 300)
    assert after[:4] == "cbca"
    for start in range(3, 298):
        assert sorted(after[start : start + 3]) == ["a", "b", "c"], start


def test_round_robin_down_backend_gets_nothing_then_gets_its_share_back() -> None:
    heavy, light = Backend("a", 3), Backend("b", 1)
    strategy = RoundRobin()
    names(strategy, [heavy, light], 5)
    assert names(strategy, [heavy], 7) == "a" * 7
    after = names(strategy, [heavy, light], 401)
    # Back in the exact 3:1 rhythm within the first cycle of 4.
    assert after[4:].count("b") == 99
    assert "b" in after[:4]


def test_round_robin_added_backend_joins_the_rotation() -> None:
    a, b, c = Backend("a"), Backend("b"), Backend("c")
    strategy = RoundRobin()
    names(strategy, [a, b], 3)
    assert Counter(names(strategy, [a, b, c], 30)) == {"a": 10, "b": 10, "c": 10}


def _state_after_removal_is_forgotten(strategy: RoundRobin, remove: object) -> str:
    """With weights a1, b3 one pick leaves a=+1, b=-1; b is then removed and re-added.

    Remembered, b's -1 makes the re-added pick a tie that a wins; forgotten,
    b starts from 0 and wins.
    """
    a, b = Backend("a", 1), Backend("b", 3)
    assert strategy.choose([a, b]) is b
    remove()  # type: ignore[operator]
    assert strategy.choose([a]) is a
    chosen = strategy.choose([a, b])
    assert chosen is not None
    return chosen.name


def test_round_robin_forgets_backends_dropped_by_set_backends() -> None:
    strategy = RoundRobin()
    assert _state_after_removal_is_forgotten(strategy, lambda: strategy.set_backends([Backend("a")])) == "b"


def test_round_robin_remembers_a_backend_that_is_only_briefly_absent() -> None:
    strategy = RoundRobin()
    assert _state_after_removal_is_forgotten(strategy, lambda: None) == "a"


def test_round_robin_forgets_backends_unseen_for_forget_after_picks() -> None:
    strategy = RoundRobin(forget_after=2)
    assert _state_after_removal_is_forgotten(strategy, lambda: names(strategy, [Backend("a", 1)], 3)) == "b"


def test_round_robin_rejects_non_positive_forget_after() -> None:
    with pytest.raises(ValueError, match="forget_after"):
        RoundRobin(forget_after=0)


# --- least_connections --------------------------------------------------------------


def test_least_connections_picks_lowest_active_requests_per_weight() -> None:
    a = Backend("a", weight=1, active_requests=1)  # 1.0
    b = Backend("b", weight=3, active_requests=2)  # 0.67
    c = Backend("c", weight=1, active_requests=0)  # 0.0
    strategy = LeastConnections()
    assert strategy.choose([a, b, c]) is c
    c.active_requests = 1
    assert strategy.choose([a, b, c]) is b


def test_least_connections_rotates_among_idle_backends_instead_of_always_the_first() -> None:
    assert names(LeastConnections(), [Backend("a"), Backend("b"), Backend("c")], 7) == "abcabca"


def test_least_connections_rotates_only_among_the_tied() -> None:
    backends = [Backend("a"), Backend("b", active_requests=5), Backend("c")]
    assert names(LeastConnections(), backends, 6) == "acacac"


def test_least_connections_treats_equal_ratios_with_different_weights_as_a_tie() -> None:
    backends = [Backend("a", weight=2, active_requests=2), Backend("b", weight=1, active_requests=1)]
    assert names(LeastConnections(), backends, 4) == "abab"


def test_least_connections_keeps_rotating_when_the_last_pick_goes_away() -> None:
    a, b, c = Backend("a"), Backend("b"), Backend("c")
    strategy = LeastConnections()
    assert names(strategy, [a, b, c], 2) == "ab"
    assert names(strategy, [a, c], 4) == "acac"


# --- power_of_two ---------------------------------------------------------------------


def test_power_of_two_never_picks_the_busiest_of_several() -> None:
    backends = [Backend("a", active_requests=1), Backend("b", active_requests=50), Backend("c", active_requests=2)]
    strategy = PowerOfTwo(rng=random.Random(7))
    picks = Counter(names(strategy, backends, 2000))
    assert picks["b"] == 0
    # a beats c whenever both are drawn, c wins only when drawn with b: about 1/3.
    assert 0.25 < picks["c"] / 2000 < 0.42


def test_power_of_two_draws_two_distinct_backends() -> None:
    busy, idle = Backend("a", weight=100, active_requests=3), Backend("b", weight=1)
    # Drawing the heavy busy one twice would return it; distinct draws always see idle.
    assert names(PowerOfTwo(rng=random.Random(1)), [busy, idle], 500) == "b" * 500


def test_power_of_two_idle_pool_follows_weights_because_ties_go_to_the_first_draw() -> None:
    backends = [Backend("a", weight=3), Backend("b", weight=1)]
    share = names(PowerOfTwo(rng=random.Random(3)), backends, 8000).count("a") / 8000
    assert 0.72 < share < 0.78


def test_power_of_two_is_reproducible_with_a_seeded_rng() -> None:
    backends = [Backend(n, weight=w) for n, w in zip("abcd", (1, 2, 3, 4))]
    first = names(make_strategy("power_of_two", rng=random.Random(42)), backends, 200)
    second = names(make_strategy("power_of_two", rng=random.Random(42)), backends, 200)
    other = names(make_strategy("power_of_two", rng=random.Random(43)), backends, 200)
    assert first == second
    assert first != other


# --- random ----------------------------------------------------------------------------


def test_random_is_weighted() -> None:
    backends = [Backend("a", weight=1), Backend("b", weight=3)]
    share = names(RandomChoice(rng=random.Random(5)), backends, 8000).count("b") / 8000
    assert 0.72 < share < 0.78


def test_random_uses_the_injected_rng() -> None:
    backends = [Backend("a"), Backend("b"), Backend("c")]
    first = names(make_strategy("random", rng=random.Random(9)), backends, 100)
    assert first == names(make_strategy("random", rng=random.Random(9)), backends, 100)
    assert first != names(make_strategy("random", rng=random.Random(10)), backends, 100)


# --- consistent_hash -----------------------------------------------------------


def test_consistent_hash_sends_the_same_key_to_the_same_backend() -> None:
    backends = [Backend(n) for n in "abcd"]
    strategy = ring(backends)
    first = owners(strategy, backends, KEYS[:500])
    assert owners(strategy, backends, KEYS[:500]) == first
    assert len(set(first.values())) == 4


def test_consistent_hash_spreads_10k_keys_roughly_evenly_over_4_backends() -> None:
    backends = [Backend(f"backend-{i}") for i in range(4)]
    counts = Counter(owners(ring(backends), backends, KEYS).values())
    for name in (b.name for b in backends):
        assert 0.15 <= counts[name] / len(KEYS) <= 0.35, counts


def test_consistent_hash_adding_a_fifth_backend_moves_at_most_a_quarter_of_keys_all_to_it() -> None:
    four = [Backend(f"backend-{i}") for i in range(4)]
    five = [*four, Backend("backend-4")]
    before = owners(ring(four), four, KEYS)
    after = owners(ring(five), five, KEYS)
    moved = [key for key in KEYS if before[key] != after[key]]
    assert 0 < len(moved) / len(KEYS) <= 0.25
    assert {after[key] for key in moved} == {"backend-4"}


def test_consistent_hash_removing_a_backend_moves_only_its_keys() -> None:
    five = [Backend(f"backend-{i}") for i in range(5)]
    four = [b for b in five if b.name != "backend-2"]
    before = owners(ring(five), five, KEYS)
    after = owners(ring(four), four, KEYS)
    moved = {key for key in KEYS if before[key] != after[key]}
    assert moved == {key for key in KEYS if before[key] == "backend-2"}


@pytest.mark.parametrize("unavailable", [{"b"}, {"a", "c"}, {"b", "c", "d"}])
def test_consistent_hash_key_of_an_unavailable_backend_goes_to_the_next_candidate_clockwise(
    unavailable: set[str],
) -> None:
    everyone = [Backend(n) for n in "abcde"]
    candidates = [b for b in everyone if b.name not in unavailable]
    keys = KEYS[:3000]
    full = ring(everyone)
    normal = owners(full, everyone, keys)
    degraded = owners(full, candidates, keys)
    # Skipping a backend's points clockwise is the same as a ring without it.
    assert degraded == owners(ring(candidates), candidates, keys)
    assert all(degraded[k] == normal[k] for k in keys if normal[k] not in unavailable)
    assert all(degraded[k] not in unavailable for k in keys)


def test_consistent_hash_without_set_backends_builds_the_ring_from_candidates() -> None:
    backends = [Backend(n) for n in "abcd"]
    assert owners(ConsistentHash(), backends, KEYS[:2000]) == owners(ring(backends), backends, KEYS[:2000])


def test_consistent_hash_reaches_a_candidate_missing_from_set_backends() -> None:
    a, b, c = Backend("a"), Backend("b"), Backend("c")
    strategy = ring([a, b])
    assert set(owners(strategy, [c], KEYS[:50]).values()) == {"c"}
    assert set(owners(strategy, [a, c], KEYS[:2000]).values()) == {"a", "c"}


def test_consistent_hash_weight_2_gets_about_twice_the_keys() -> None:
    backends = [Backend("a", weight=2), Backend("b"), Backend("c")]
    counts = Counter(owners(ring(backends), backends, KEYS).values())
    assert 1.6 < counts["a"] / counts["b"] < 2.4
    assert 1.6 < counts["a"] / counts["c"] < 2.4


def test_consistent_hash_rebuilds_the_ring_when_a_weight_changes() -> None:
    strategy = ConsistentHash()
    equal = [Backend(n) for n in "abcd"]
    strategy.set_backends(equal)
    before = Counter(owners(strategy, equal, KEYS).values())
    heavier = [Backend("a", weight=4), *equal[1:]]
    strategy.set_backends(heavier)
    after = Counter(owners(strategy, heavier, KEYS).values())
    assert after["a"] > 1.8 * before["a"]


def test_consistent_hash_without_key_falls_back_to_round_robin() -> None:
    backends = [Backend("a"), Backend("b"), Backend("c")]
    assert names(ring(backends), backends, 6) == "abcabc"


@pytest.mark.slow
def test_consistent_hash_mapping_is_stable_across_processes() -> None:
    script = (
        "import json\n"
        "from dataclasses import dataclass\n"
        "from lb_system.balancing.strategies import ConsistentHash\n"
        "@dataclass\n"
        "class B:\n"
        "    name: str\n"
        "    weight: int = 1\n"
        "    active_requests: int = 0\n"
        "bs = [B(n) for n in 'abcde']\n"
        "s = ConsistentHash()\n"
        "print(json.dumps([s.choose(bs, f'user-{i}').name for i in range(200)]))\n"
    )
    results = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, "-c", script], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, check=True
        )
        results.append(json.loads(done.stdout))
    backends = [Backend(n) for n in "abcde"]
    here = [owners(ConsistentHash(), backends, KEYS[:200])[k] for k in KEYS[:200]]
    assert results[0] == results[1] == here


# --- hash_key / validate_hash_on ----------------------------------------------------


def test_hash_key_on_client_ip_and_path() -> None:
    request = {"client_ip": "10.0.0.7", "path": "/cart/42", "headers": {"X-User": "u1"}}
    assert hash_key("client_ip", **request) == "10.0.0.7"  # type: ignore[arg-type]
    assert hash_key("path", **request) == "/cart/42"  # type: ignore[arg-type]


@pytest.mark.parametrize("hash_on", ["header:X-User", "header:x-user", "header:X-USER"])
def test_hash_key_header_lookup_is_case_insensitive(hash_on: str) -> None:
    headers = {"Accept": "*/*", "x-User": "u1"}
    assert hash_key(hash_on, client_ip="1.2.3.4", path="/", headers=headers) == "u1"


def test_hash_key_missing_header_gives_none() -> None:
    assert hash_key("header:X-User", client_ip="1.2.3.4", path="/", headers={"Accept": "*/*"}) is None


def test_hash_key_rejects_an_invalid_hash_on() -> None:
    with pytest.raises(ValueError, match="hash_on"):
        hash_key("cookie", client_ip="1.2.3.4", path="/", headers={})


@pytest.mark.parametrize("value", ["client_ip", "path", "header:X-User", "header:x_tenant-id"])
def test_validate_hash_on_accepts_the_documented_forms(value: str) -> None:
    validate_hash_on(value)


@pytest.mark.parametrize("value", ["", "ip", "Path", "client-ip", "header:", "header:X User", "header:a:b", "headers:X"])
def test_validate_hash_on_rejects_anything_else_with_a_clear_message(value: str) -> None:
    with pytest.raises(ValueError) as info:
        validate_hash_on(value)
    message = str(info.value)
    assert repr(value) in message
    assert "header" in message
