"""Writing one watch stream: its lines as they come, a heartbeat after `heartbeat_s` without
one, and an end to a stream whose client stopped taking lines.

Per change, a stream costs one wake-up of its task and one write of lines encoded once for
every stream (state.py), with whatever else is queued by then in the same write. No timer is
made or cancelled per line: one timer per stream, firing at most once per `heartbeat_s`
while the stream is idle, queues the heartbeat and ends a write that has waited for the
client longer than `stream_write_timeout_s` (an `asyncio.timeout` around each wait and each
write made and cancelled two timers per line and stream, and a heartbeat went through a
cancellation: bench/registry_scale.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from .stream import Stream
from .timings import Timings


class Writable(Protocol):
    async def write(self, data: bytes) -> None: ...


class Pump:
    """Moves the lines of `stream` to `response` until the stream ends or its client stops
    taking them; `abort` ends the connection of a client that stopped."""

    def __init__(self, response: Writable, stream: Stream, heartbeat: Callable[[], bytes],
                 timings: Timings, abort: Callable[[], None]) -> None:
        self._response = response
        self._stream = stream
        self._heartbeat = heartbeat
        self._heartbeat_s = timings.heartbeat_s
        self._write_timeout_s = timings.stream_write_timeout_s
        self._abort = abort
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[object] | None = None
        self._last_write = self._loop.time()
        self._writing_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.stalled = False  # the client took no line for stream_write_timeout_s

    async def run(self, first: bytes) -> bool:
        """Write `first`, then every line the stream gets; False if the client stopped
        taking them (its connection is aborted), True when the stream was closed."""
        self._task = asyncio.current_task()
        self._arm(self._last_write + min(self._heartbeat_s, self._write_timeout_s))
        queue = self._stream.queue
        try:
            if first and not await self._write(first):
                return False
            while True:
                lines = [await queue.get()]
                # Whatever else is queued goes in the same write: a burst of changes (an
                # observer slice holds up to 200) costs each stream one wake-up and one write.
                while not queue.empty():
                    lines.append(queue.get_nowait())
                if None in lines:  # closed: overflow, replaced or shutdown; the client resumes
                    return True
                if not await self._write(b"".join(filter(None, lines))):
                    return False
        finally:
            if self._timer is not None:
                self._timer.cancel()

    async def _write(self, data: bytes) -> bool:
        self._writing_since = self._loop.time()
        try:
            await self._response.write(data)
        except (asyncio.CancelledError, ConnectionResetError):
            if not self.stalled:
                raise
            if self._task is not None:
                self._task.uncancel()
            return False
        finally:
            self._writing_since = None
        self._last_write = self._loop.time()
        return True

    def _arm(self, when: float) -> None:
        self._timer = self._loop.call_at(when, self._tick)

    def _tick(self) -> None:
        now = self._loop.time()
        writing_since = self._writing_since
        if writing_since is not None:
            if now - writing_since >= self._write_timeout_s:
                self.stalled = True
                self._abort()  # mid-line: the connection cannot be reused
                if self._task is not None:
                    self._task.cancel()  # the write may wait for a drain that never comes
                return
            self._arm(min(writing_since + self._write_timeout_s, now + self._heartbeat_s))
        # The heartbeat queued a tick ago was written a little after that tick: it still
        # counts as silence, or each heartbeat would take two ticks.
        elif now - self._last_write >= self._heartbeat_s * 0.95:
            self._stream.offer(self._heartbeat())
            self._arm(now + self._heartbeat_s)
        else:
            self._arm(self._last_write + self._heartbeat_s)
