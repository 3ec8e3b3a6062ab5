"""Server-Sent Events for the dashboard: one snapshot per interval, fanned out to every client.

The snapshot is computed once per tick whatever the number of clients, and only while at
least one is connected: with no dashboard open the feed has no task and costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable

from aiohttp import web
from aiohttp_sse import sse_response

from lb_system.balancing.events import Observer, Transition

Snapshot = Callable[[], dict[str, object]]
# Tells EventSource how soon to reconnect after the connection drops (a balancer restart).
RECONNECT_MS = 1000


class _Mailbox:
    """The newest message for one client: a slow client skips ticks instead of queueing them."""

    def __init__(self) -> None:
        self._message: str | None = None
        self._ready = asyncio.Event()
        self.closed = False

    def put(self, message: str) -> None:
        self._message = message
        self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    async def get(self) -> str | None:
        """The next message, or None once the feed is closed."""
        await self._ready.wait()
        self._ready.clear()
        return None if self.closed else self._message


class LiveFeed(Observer):
    """Serves `GET /events`: a `snapshot` event on connect, then an `update` event every
    `interval` seconds, and one at once when a backend goes up or down (it observes transitions).
    `close()` (on app shutdown) ends every stream."""

    def __init__(self, snapshot: Snapshot, *, interval: float = 1.0, logger: logging.Logger | None = None) -> None:
        self._snapshot = snapshot
        self.interval = interval
        self.logger = logger or logging.getLogger("lb_system.live")
        self._clients: set[_Mailbox] = set()
        self._task: asyncio.Task[None] | None = None
        self._stopping: set[asyncio.Task[None]] = set()  # cancelled, not yet finished
        self._closed = False
        self._changed = asyncio.Event()  # a transition: publish now, not at the next tick

    @property
    def client_count(self) -> int:
        return len(self._clients)

    @property
    def publishing(self) -> bool:
        return self._task is not None and not self._task.done()

    def _message(self) -> str:
        # The page counts missed ticks to notice a feed that stalled without closing.
        return json.dumps(self._snapshot() | {"interval_s": self.interval}, separators=(",", ":"))

    def on_transition(self, backend: str, transition: Transition) -> None:
        if self.publishing:
            self._changed.set()

    async def _publish(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._changed.wait()
            self._changed.clear()
            try:
                message = self._message()
            except Exception:  # a bug here must not freeze every open dashboard for good
                self.logger.exception("live feed snapshot failed")
                continue
            for client in self._clients:
                client.put(message)

    def _join(self, client: _Mailbox) -> None:
        self._clients.add(client)
        if not self.publishing:
            self._task = asyncio.create_task(self._publish(), name="live-feed")

    def _leave(self, client: _Mailbox) -> None:
        self._clients.discard(client)
        if not self._clients and self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    async def handle(self, request: web.Request, headers: dict[str, str]) -> web.StreamResponse:
        if self._closed:
            raise web.HTTPServiceUnavailable(text="Shutting down")
        client = _Mailbox()
        async with sse_response(request, headers=headers) as stream:
            self._join(client)
            try:
                await stream.send(self._message(), event="snapshot", retry=RECONNECT_MS)
                while (message := await client.get()) is not None:
                    await stream.send(message, event="update")
            except (ConnectionResetError, TimeoutError):
                pass  # the client went away or stalled: its stream simply ends
            finally:
                self._leave(client)
        return stream

    async def close(self) -> None:
        """End every stream and the publisher; new clients get 503."""
        self._closed = True
        for client in list(self._clients):
            client.close()
        tasks = set(self._stopping)
        if self._task is not None:
            tasks.add(self._task)
            self._task = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
