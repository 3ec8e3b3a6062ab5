"""Schemathesis against the live system through the balancer: generated requests (valid and
invalid) and stateful create -> read -> patch -> delete chains, checked against /openapi.json."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.configuration import set_hypothesis_home_dir
from schemathesis import GenerationMode
from schemathesis.core.transport import Response

from lb_system import System

# Why a thread: schemathesis calls are synchronous (requests over real sockets). Run on
# pytest-aiohttp's loop they would block the very loop that must answer them. The system gets its
# own loop in a background thread instead, in this process, so a failure shows the server's log
# and traceback in the test's output (a `run.py` subprocess would hide them).

FUZZ_SETTINGS = settings(
    derandomize=True,  # the same requests on every run: a failure reproduces
    deadline=None,  # timing is not what this test checks
    database=None,  # no example database written into the repository
    suppress_health_check=list(HealthCheck),
    print_blob=False,
)
STATELESS_EXAMPLES = 1000
STATEFUL_SCENARIOS = 40
MIN_REQUESTS = 1000
# /debug/crash answers 500 by design; /events is an endless stream that a plain request would wait on.
NOT_FUZZED = ("/debug/crash", "/events")


class LiveSystem:
    """A System serving from its own event loop in a background thread."""

    def __init__(self, system: System) -> None:
        self.system = system
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="live-system", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.system.start(), self.loop).result(timeout=30)
        return self.system.balancer_url

    def __exit__(self, *exc_info: object) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.system.stop(), self.loop).result(timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30)
            self.loop.close()


@pytest.fixture(autouse=True)
def hypothesis_files_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # Hypothesis caches what it learns in ./.hypothesis; keep the repository clean.
    set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
    yield
    set_hypothesis_home_dir(None)


@pytest.fixture
def balancer_url(make_config) -> Iterator[str]:
    # debug_endpoints stay on: the document lists /debug/crash, and the fuzzer leaves it alone.
    with LiveSystem(System(make_config())) as url:
        yield url


# Schemathesis's strategies draw from `random` (hypothesis deprecates that; schemathesis's concern, not ours).
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
def test_fuzzing_through_the_balancer_finds_no_server_error_and_no_answer_off_the_spec(balancer_url: str) -> None:
    # The document under test is the one the balancer serves, fetched over its socket.
    schema = schemathesis.openapi.from_url(f"{balancer_url}/openapi.json", timeout=10)
    for path in NOT_FUZZED:
        schema = schema.exclude(path=path)
    sent: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    modes: Counter[str] = Counter()
    chained: Counter[tuple[str, int]] = Counter()  # stateful answers on /tasks/{id}: the links at work

    with requests.Session() as session:

        def call(case: schemathesis.Case, kind: str) -> Response:
            response = case.call(base_url=balancer_url, session=session, timeout=10)
            sent[kind] += 1
            if kind == "stateful" and case.operation.path == "/tasks/{id}":
                chained[case.method, response.status_code] += 1
            if case.meta is not None:
                modes[case.meta.generation.mode.value] += 1
            statuses[response.status_code] += 1
            return response

        # Valid and invalid requests alike (as_strategy alone makes only valid ones).
        @given(case=schema.as_strategy(GenerationMode.POSITIVE) | schema.as_strategy(GenerationMode.NEGATIVE))
        @settings(FUZZ_SETTINGS, max_examples=STATELESS_EXAMPLES)
        def stateless(case: schemathesis.Case) -> None:
            case.validate_response(call(case, "stateless"))

        class Stateful(schema.as_state_machine()):  # type: ignore[misc]
            def call(self, case: schemathesis.Case, **kwargs: object) -> Response:
                return call(case, "stateful")

        stateless()
        Stateful.run(settings=settings(FUZZ_SETTINGS, max_examples=STATEFUL_SCENARIOS, stateful_step_count=6))

    print(
        f"requests sent: {dict(sent)}; data: {dict(modes)}; statuses: {dict(sorted(statuses.items()))}; chained: {dict(chained)}"
    )
    assert sent.total() >= MIN_REQUESTS, sent
    # Links took created ids to a read, a patch and a delete (random ids would mostly meet 404).
    assert chained["GET", 200] and chained["PATCH", 200] and chained["DELETE", 204], chained
    assert not [status for status in statuses if status >= 500], statuses
