"""Unit tests for lb_system.balancing.retry: pure policy, fake clock, no sleeping."""

from __future__ import annotations

import dataclasses

import pytest
from support.clock import FakeClock

from lb_system.balancing.retry import IDEMPOTENT_METHODS, FailureKind, RetryBudget, RetryPolicy

IDEMPOTENT = sorted(IDEMPOTENT_METHODS)
NON_IDEMPOTENT = ["POST", "PATCH", "CONNECT"]
AFTER_SENDING = [FailureKind.RESET, FailureKind.TIMEOUT, FailureKind.STATUS]


# --- RetryPolicy -------------------------------------------------------------


def test_idempotent_methods_are_the_rfc_ones() -> None:
    assert IDEMPOTENT_METHODS == {"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"}


def test_failure_kinds_describe_what_happened() -> None:
    assert FailureKind.CONNECT.value == "connect failed: nothing was sent"
    assert FailureKind.RESET.value == "connection dropped or reset before the response started"
    assert FailureKind.TIMEOUT.value == "per-try timeout"
    assert FailureKind.STATUS.value == "answered with a retryable status"


@pytest.mark.parametrize("method", IDEMPOTENT + NON_IDEMPOTENT)
def test_connect_failure_is_retried_for_any_method(method: str) -> None:
    assert RetryPolicy().should_retry(method=method, failure=FailureKind.CONNECT, attempt=1)


@pytest.mark.parametrize("failure", AFTER_SENDING)
@pytest.mark.parametrize("method", IDEMPOTENT)
def test_failure_after_sending_is_retried_for_idempotent_methods(method: str, failure: FailureKind) -> None:
    assert RetryPolicy().should_retry(method=method, failure=failure, attempt=1)


@pytest.mark.parametrize("failure", AFTER_SENDING)
@pytest.mark.parametrize("method", NON_IDEMPOTENT)
def test_failure_after_sending_is_not_retried_for_non_idempotent_methods(method: str, failure: FailureKind) -> None:
    assert not RetryPolicy().should_retry(method=method, failure=failure, attempt=1)


def test_method_names_are_case_sensitive_so_lowercase_get_is_not_idempotent() -> None:
    policy = RetryPolicy()
    assert not policy.should_retry(method="get", failure=FailureKind.RESET, attempt=1)
    assert policy.should_retry(method="get", failure=FailureKind.CONNECT, attempt=1)


@pytest.mark.parametrize("failure", list(FailureKind))
def test_retries_stop_once_attempts_exceed_retries(failure: FailureKind) -> None:
    policy = RetryPolicy(retries=2)
    verdicts = [policy.should_retry(method="GET", failure=failure, attempt=n) for n in (1, 2, 3, 4)]
    assert verdicts == [True, True, False, False]


def test_zero_retries_never_retries() -> None:
    policy = RetryPolicy(retries=0)
    assert not policy.should_retry(method="GET", failure=FailureKind.CONNECT, attempt=1)


def test_attempt_below_one_is_a_caller_bug() -> None:
    with pytest.raises(ValueError, match="attempt"):
        RetryPolicy().should_retry(method="GET", failure=FailureKind.CONNECT, attempt=0)


@pytest.mark.parametrize("failure", list(FailureKind))
def test_never_retries_once_the_response_started(failure: FailureKind) -> None:
    policy = RetryPolicy()
    assert not policy.should_retry(method="GET", failure=failure, attempt=1, response_started=True)


@pytest.mark.parametrize("failure", list(FailureKind))
def test_never_retries_when_the_body_cannot_be_replayed(failure: FailureKind) -> None:
    policy = RetryPolicy()
    assert not policy.should_retry(method="PUT", failure=failure, attempt=1, body_replayable=False)


def test_default_retryable_statuses_are_502_503_504() -> None:
    policy = RetryPolicy()
    assert [s for s in (200, 404, 429, 500, 501, 502, 503, 504, 505) if policy.retryable_status(s)] == [502, 503, 504]


def test_custom_retryable_statuses_replace_the_defaults() -> None:
    policy = RetryPolicy(retry_on_status=frozenset({429, 503}))
    assert policy.retryable_status(429)
    assert policy.retryable_status(503)
    assert not policy.retryable_status(502)


def test_policy_stores_any_set_of_statuses_as_a_frozenset() -> None:
    policy = RetryPolicy(retry_on_status={503})  # type: ignore[arg-type]
    assert policy.retry_on_status == frozenset({503})
    assert isinstance(policy.retry_on_status, frozenset)
    hash(policy)


def test_policy_is_immutable() -> None:
    policy = RetryPolicy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.retries = 5  # type: ignore[misc]


def test_policy_rejects_negative_retries() -> None:
    with pytest.raises(ValueError, match="retries"):
        RetryPolicy(retries=-1)


def test_policy_rejects_codes_that_are_not_http_statuses() -> None:
    with pytest.raises(ValueError, match="99"):
        RetryPolicy(retry_on_status=frozenset({99, 503}))


# --- RetryBudget -------------------------------------------------------------


def test_budget_floor_admits_min_concurrent_retries_without_any_traffic() -> None:
    budget = RetryBudget(20.0, min_concurrent=3, clock=FakeClock())
    assert [budget.try_acquire() for _ in range(4)] == [True, True, True, False]
    assert budget.active == 3


def test_budget_release_frees_a_floor_slot() -> None:
    budget = RetryBudget(20.0, min_concurrent=2, clock=FakeClock())
    assert budget.try_acquire() and budget.try_acquire()
    assert not budget.try_acquire()
    budget.release()
    assert budget.active == 1
    assert budget.try_acquire()
    assert budget.active == 2


def test_budget_percent_admits_retries_up_to_that_share_of_recent_requests() -> None:
    budget = RetryBudget(20.0, min_concurrent=0, clock=FakeClock())
    for _ in range(10):
        budget.on_request()
    assert [budget.try_acquire() for _ in range(3)] == [True, True, False]
    assert budget.active == 2


def test_budget_percent_counts_the_retry_being_asked_for() -> None:
    budget = RetryBudget(20.0, min_concurrent=0, clock=FakeClock())
    for _ in range(4):
        budget.on_request()
    assert not budget.try_acquire()  # 1 retry > 20% of 4 requests
    budget.on_request()
    assert budget.try_acquire()  # 1 retry == 20% of 5 requests


def test_budget_release_does_not_refund_the_percent_budget_within_the_window() -> None:
    budget = RetryBudget(20.0, min_concurrent=0, clock=FakeClock())
    for _ in range(10):
        budget.on_request()
    assert budget.try_acquire() and budget.try_acquire()
    budget.release()
    budget.release()
    assert budget.active == 0
    assert not budget.try_acquire()


def test_budget_floor_admitted_retries_still_count_against_the_percent() -> None:
    budget = RetryBudget(20.0, min_concurrent=1, clock=FakeClock())
    for _ in range(10):
        budget.on_request()
    assert budget.try_acquire()  # floor: nothing active
    assert budget.try_acquire()  # percent: 2 <= 20% of 10
    assert not budget.try_acquire()  # 3 > 2, and the floor is taken


def test_budget_requests_roll_off_after_the_window() -> None:
    clock = FakeClock(100.0)
    budget = RetryBudget(20.0, min_concurrent=0, window=10.0, clock=clock)
    for _ in range(5):
        budget.on_request()
    clock.now = 109.99
    assert budget.try_acquire()
    budget.release()
    clock.now = 110.0
    for _ in range(5):
        budget.on_request()
    # The first 5 requests left the window, and the retry at 109.99 still counts.
    assert not budget.try_acquire()


def test_budget_retries_roll_off_after_the_window() -> None:
    clock = FakeClock(0.0)
    budget = RetryBudget(20.0, min_concurrent=0, window=10.0, clock=clock)
    for _ in range(10):
        budget.on_request()
    clock.advance(5)
    assert budget.try_acquire() and budget.try_acquire()
    clock.advance(5)  # t=10: the t=0 requests are gone, the t=5 retries are not
    for _ in range(10):
        budget.on_request()
    assert not budget.try_acquire()
    clock.advance(5)  # t=15: the t=5 retries are gone too
    assert budget.try_acquire() and budget.try_acquire()
    assert not budget.try_acquire()
    assert budget.active == 4


def test_budget_forgets_everything_after_a_long_idle_gap() -> None:
    clock = FakeClock(0.0)
    budget = RetryBudget(50.0, min_concurrent=0, window=10.0, clock=clock)
    for _ in range(1000):
        budget.on_request()
    clock.advance(1_000_000)
    assert not budget.try_acquire()
    budget.on_request()
    budget.on_request()
    assert budget.try_acquire()


def test_budget_release_without_a_retry_is_a_caller_bug() -> None:
    budget = RetryBudget(clock=FakeClock())
    with pytest.raises(RuntimeError, match="release"):
        budget.release()


def test_budget_after_a_failed_acquire_has_nothing_to_release() -> None:
    budget = RetryBudget(0.0, min_concurrent=0, clock=FakeClock())
    assert not budget.try_acquire()
    assert budget.active == 0
    with pytest.raises(RuntimeError):
        budget.release()


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"percent": -1.0}, "percent"),
        ({"min_concurrent": -1}, "min_concurrent"),
        ({"window": 0.0}, "window"),
    ],
)
def test_budget_rejects_nonsense_parameters(kwargs: dict[str, float], word: str) -> None:
    with pytest.raises(ValueError, match=word):
        RetryBudget(**kwargs)  # type: ignore[arg-type]
