"""Every private name of aiohttp's server that lb_system uses, each wrapped once here.

Written for aiohttp 3.14 (pyproject pins `aiohttp>=3.14,<3.15`); tests/test_aiohttp_hooks.py
fails naming the hook when a release changes one. Refusals are answered through the public
`RequestHandler.handle_error(request, status, exc, message)` (proxy/client_limits.py), not
the private `_make_error_handler` that calls it.

- `web_protocol._ErrInfo`: what aiohttp queues among a connection's parsed messages for a
  request its parser refused; `RequestHandler.start` answers it with `handle_error`. A limit
  of ours (a header section too large or too slow) queues one the same way.
- `AppRunner._make_server` and `Server._kwargs`: where a runner makes its `web.Server`, and the
  settings (debug, access log, handler_args, timeouts) that server hands each connection; a
  runner here makes the same server with a protocol of ours.
- `Request._match_info`: the route match `Application._handle` sets; the balancer's front
  gives a proxied request the catch-all's without walking the router.

Beyond these names, `client_limits.ClientConnection` subclasses `RequestHandler` and reads
some of its slots (`RequestHandler` is public, its state is not): the test checks each one
it names in `REQUEST_HANDLER_SLOTS`.
"""

from __future__ import annotations

import asyncio
from abc import abstractmethod
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import _ErrInfo

# What queued_refusal makes: the type a connection's message queue holds besides parsed requests.
QueuedRefusal = _ErrInfo

# The RequestHandler state ClientConnection reads or sets: its slots in aiohttp 3.14.
REQUEST_HANDLER_SLOTS = (
    "_close",
    "_current_request",
    "_force_close",
    "_loop",
    "_messages",
    "_payload_parser",
    "_reading_paused",
    "_request_count",
    "_upgraded",
    "_waiter",
)


def queued_refusal(status: int, exc: BaseException, message: str) -> QueuedRefusal:
    """A refusal to put in a connection's message queue in place of a parsed request:
    answered in turn by `handle_error(request, status, exc, message)`."""
    return _ErrInfo(status=status, exc=exc, message=message)


def set_match_info(request: web.Request, match: web.UrlMappingMatchInfo) -> None:
    """Give `request` a route match, as `Application._handle` does after the router's resolve."""
    request._match_info = match


class ProtocolRunner(web.AppRunner):
    """An AppRunner whose `web.Server` is made by `make_server`, from the server aiohttp made."""

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        return self.make_server(plain, dict(plain._kwargs), asyncio.get_running_loop())

    @abstractmethod
    def make_server(self, plain: web.Server, settings: dict[str, Any], loop: asyncio.AbstractEventLoop) -> web.Server:
        """The server to run instead of `plain`; `settings` are the keywords `plain` gives each connection."""
