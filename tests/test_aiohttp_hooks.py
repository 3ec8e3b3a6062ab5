"""aiohttp's private server names that lb_system/proxy/aiohttp_hooks.py wraps: each test fails,
naming the hook, when an aiohttp release changes it (the behaviour built on them is tested in
test_client_edge.py and test_proxy.py)."""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import aiohttp
import pytest
from aiohttp import web, web_protocol
from aiohttp.test_utils import make_mocked_request

from lb_system.proxy.aiohttp_hooks import REQUEST_HANDLER_SLOTS, queued_refusal, set_match_info
from lb_system.proxy.client_limits import ClientConnection

WRITTEN_FOR = "3.14"


def hook_changed(hook: str) -> str:
    return (
        f"aiohttp hook {hook} changed in aiohttp {aiohttp.__version__} (written for {WRITTEN_FOR}): "
        "update lb_system/proxy/aiohttp_hooks.py, then the pin in pyproject.toml"
    )


def test_the_installed_aiohttp_is_the_minor_release_the_hooks_were_written_for() -> None:
    assert aiohttp.__version__.startswith(WRITTEN_FOR + "."), hook_changed("(any: another minor release)")


def test_err_info_is_a_status_exception_and_message_that_start_answers_with_handle_error() -> None:
    hook = "web_protocol._ErrInfo"
    assert hasattr(web_protocol, "_ErrInfo"), hook_changed(hook)
    error = ValueError("x")
    refusal = queued_refusal(431, error, "too large")
    assert (refusal.status, refusal.exc, refusal.message) == (431, error, "too large"), hook_changed(hook)
    start = inspect.getsource(web_protocol.RequestHandler.start)
    assert "isinstance(message, _ErrInfo)" in start, hook_changed(hook + " (RequestHandler.start no longer dispatches on it)")
    # What start calls for it: the private _make_error_handler, which calls the public handle_error.
    maker = inspect.getsource(web_protocol.RequestHandler._make_error_handler)
    assert "handle_error(" in maker and "err_info.status, err_info.exc, err_info.message" in maker, hook_changed(
        "RequestHandler._make_error_handler -> handle_error(request, status, exc, message)"
    )


def test_handle_error_takes_request_status_exc_and_message() -> None:
    parameters = list(inspect.signature(web_protocol.RequestHandler.handle_error).parameters)
    assert parameters == ["self", "request", "status", "exc", "message"], hook_changed("RequestHandler.handle_error")


async def ok(request: web.BaseRequest) -> web.StreamResponse:
    return web.Response()


def test_match_info_is_the_attribute_match_info_reads() -> None:
    hook = "web.Request._match_info"
    request = make_mocked_request("GET", "/x")
    route = web.UrlDispatcher().add_get("/x", ok)
    match = web.UrlMappingMatchInfo({"k": "v"}, route)
    set_match_info(request, match)
    assert request.match_info is match, hook_changed(hook)
    handle = inspect.getsource(web.Application._handle)
    assert "request._match_info = match_info" in handle, hook_changed(hook + " (Application._handle sets it no more)")


async def test_a_server_keeps_its_connection_settings_in_kwargs() -> None:
    hook = "web.Server._kwargs"
    server = web.Server(ok, debug=True, access_log_class=object)
    assert getattr(server, "_kwargs", None) == {"debug": True, "access_log_class": object}, hook_changed(hook)
    assert "**self._kwargs" in inspect.getsource(web.Server.__call__), hook_changed(hook + " (Server.__call__)")


def test_an_app_runner_makes_its_server_in_make_server() -> None:
    hook = "web.AppRunner._make_server"
    make_server = getattr(web.AppRunner, "_make_server", None)
    assert make_server is not None and inspect.iscoroutinefunction(make_server), hook_changed(hook)
    assert "self._server = await self._make_server()" in inspect.getsource(web.BaseRunner.setup), hook_changed(
        hook + " (BaseRunner.setup)"
    )


def _slots(cls: type) -> Iterator[str]:
    for klass in cls.__mro__:
        yield from getattr(klass, "__slots__", ())


@pytest.mark.parametrize("slot", REQUEST_HANDLER_SLOTS)
def test_request_handler_still_has_each_slot_client_connection_reads(slot: str) -> None:
    assert slot in set(_slots(web_protocol.RequestHandler)), hook_changed(f"RequestHandler.{slot}")


def test_client_connection_reads_no_request_handler_slot_left_unnamed() -> None:
    source = inspect.getsource(ClientConnection)
    inherited = set(_slots(web_protocol.RequestHandler))
    used = {name for name in inherited if name.startswith("_") and f"self.{name}" in source}
    assert used <= set(REQUEST_HANDLER_SLOTS), (
        f"name these in aiohttp_hooks.REQUEST_HANDLER_SLOTS: {sorted(used - set(REQUEST_HANDLER_SLOTS))}"
    )
