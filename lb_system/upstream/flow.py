"""Flow control of one connection to a backend, both ways, as uvicorn's `FlowControl`
(`protocols/http/flow_control.py`): the answer's body, a tunnel's bytes and the request's upload
all go through it, so memory stays bounded whoever is slow."""

from __future__ import annotations

import asyncio

# Unread bytes from the backend past this pause reading from it; a read that takes them resumes it.
HIGH_WATER = 256 * 1024


class FlowControl:
    """Reading pauses while `HIGH_WATER` bytes the backend sent wait unread (`received`,
    `consumed`); a writer awaits `drain()` while the backend is slow to take what was written
    (the transport's `pause_writing`/`resume_writing`)."""

    __slots__ = ("_drained", "_transport", "buffered", "read_paused", "write_paused")

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._drained: asyncio.Future[None] | None = None
        self.buffered = 0  # bytes received and not yet taken by the reader
        self.read_paused = False
        self.write_paused = False

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    # --- reading from the backend ---------------------------------------------------------------

    def received(self, size: int) -> None:
        """`size` more bytes wait for the reader; past HIGH_WATER, stop reading."""
        self.buffered += size
        if self.buffered >= HIGH_WATER:
            self.pause_reading()

    def consumed(self) -> None:
        """The reader took everything buffered: read again."""
        self.buffered = 0
        if self.read_paused:
            self.resume_reading()

    def pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            if self._open():
                self._transport.pause_reading()  # type: ignore[union-attr]

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            if self._open():
                self._transport.resume_reading()  # type: ignore[union-attr]

    # --- writing to the backend -----------------------------------------------------------------

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    async def drain(self) -> None:
        """Wait until the backend takes what was written (at once when it is not slow, or gone)."""
        if self.write_paused:
            self._drained = asyncio.get_running_loop().create_future()
            try:
                await self._drained
            finally:
                self._drained = None

    def connection_lost(self) -> None:
        """A writer waiting for a connection that is gone waits no more."""
        self.resume_writing()

    def _open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()
