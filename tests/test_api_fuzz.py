"""Schemathesis against the live system through the balancer: generated requests (valid and
invalid, boundary values first) and stateful create -> read -> patch -> delete chains along the
links of the balancer's /openapi.json. Any 5xx or answer off the document fails."""

from __future__ import annotations

import asyncio
import secrets
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir
from schemathesis.core.transport import Response
from support.config_files import FAST_HEALTH
from support.postgres import TemporaryPostgres, reset_task_tables

from lb_system import System, parse_config
from lb_system.proxy.openapi import balancer_document
from lb_system.tasks.openapi import task_api_document

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
EXAMPLES_PER_OPERATION = 60  # fuzzing phase; the coverage phase adds its boundary cases to these
STATEFUL_SCENARIOS = 40
MIN_REQUESTS = 1000
# /debug/crash answers 500 by design; /events is an endless stream that a plain request would wait on.
NOT_FUZZED = ("/debug/crash", "/events")


class LiveSystem:
    """A System serving from its own event loop in a background thread, and what was sent to it."""

    def __init__(self, system: System) -> None:
        self.system = system
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="live-system", daemon=True)
        self.session = requests.Session()
        self.sent: Counter[str] = Counter()  # by test: stateless, stateful
        self.statuses: Counter[int] = Counter()
        self.modes: Counter[str] = Counter()  # valid (positive) or invalid (negative) data
        self.chained: Counter[tuple[str, int]] = Counter()  # stateful answers on /tasks/{id}

    @property
    def url(self) -> str:
        return self.system.balancer_url

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.system.start(), self.loop).result(timeout=30)

    def stop(self) -> None:
        self.session.close()
        try:
            asyncio.run_coroutine_threadsafe(self.system.stop(), self.loop).result(timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30)
            self.loop.close()

    def call(self, case: schemathesis.Case, test: str) -> Response:
        response = case.call(base_url=self.url, session=self.session, timeout=10)
        self.sent[test] += 1
        self.statuses[response.status_code] += 1
        if case.meta is not None:
            self.modes[case.meta.generation.mode.value] += 1
        if test == "stateful" and case.operation.path == "/tasks/{id}":
            self.chained[case.method, response.status_code] += 1
        return response


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def live(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveSystem]:
    """The system under fuzzing, once on each task store: both must answer as the document says."""
    home = tmp_path_factory.mktemp("fuzz")
    database: dict[str, object] = {"path": "tasks.db"}
    if request.param == "postgres":
        server: TemporaryPostgres = request.getfixturevalue("postgres_server")
        reset_task_tables(server)
        database = {"url": server.url()}
    # A token nobody sends: the admin API is on, and every fuzzed admin call must be a 401.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LB_ADMIN_TOKEN", secrets.token_hex(16))
        # debug_endpoints stay on: the document lists /debug/crash, and the fuzzer leaves it alone.
        config = parse_config(
            {
                "balancer": {"port": 0},
                "health": dict(FAST_HEALTH),
                "database": database,
                "log": {"file": "balancer.log"},
                "backends": [{"name": "backend-1", "port": 0}, {"name": "backend-2", "port": 0}],
            },
            base_dir=Path(home),
        )
        system = LiveSystem(System(config))
        system.start()
        try:
            yield system
        finally:
            system.stop()
    print(f"\nsent: {dict(system.sent)}; data: {dict(system.modes)}; statuses: {dict(sorted(system.statuses.items()))}")
    if system.sent["stateless"] and system.sent["stateful"]:  # both tests ran: the whole run counts
        assert system.sent.total() >= MIN_REQUESTS, system.sent


# Hypothesis caches constants it finds in our modules (already while collecting these tests) in
# ./.hypothesis: keep that cache out of the working tree.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "lb_system-hypothesis")

# The document the balancer serves (test_openapi.py checks that it serves exactly this one), built
# here so the tests exist at collection time; requests go to the live system's socket.
# (schemathesis.pytest.from_fixture would load it from the balancer, but its lazy schemas
# use a pytest attribute that pytest 9 no longer has.)
schema: schemathesis.BaseSchema = schemathesis.openapi.from_dict(balancer_document(task_api_document(debug_endpoints=True)))
for path in NOT_FUZZED:
    schema = schema.exclude(path=path)

pytestmark = [
    pytest.mark.slow,  # thousands of generated requests
    # Schemathesis's strategies draw from `random` (hypothesis deprecates that; schemathesis's concern, not ours).
    pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning"),
]


@schema.parametrize()
@settings(FUZZ_SETTINGS, max_examples=EXAMPLES_PER_OPERATION)
def test_generated_requests_get_no_server_error_and_no_answer_off_the_document(case: schemathesis.Case, live: LiveSystem) -> None:
    case.validate_response(live.call(case, "stateless"))


def test_create_read_patch_delete_chains_follow_the_document(live: LiveSystem) -> None:
    class Chains(schema.as_state_machine()):  # type: ignore[misc]
        def call(self, case: schemathesis.Case, **kwargs: object) -> Response:
            return live.call(case, "stateful")

    Chains.run(settings=settings(FUZZ_SETTINGS, max_examples=STATEFUL_SCENARIOS, stateful_step_count=6))
    # Links took created ids to a read, a patch and a delete (random ids would mostly meet 404).
    chained = live.chained
    assert chained["GET", 200] and chained["PATCH", 200] and chained["DELETE", 204], chained
