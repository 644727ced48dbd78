"""The mailbox of one watch stream (state.py feeds it, watch.py drains it into the response).

Its lines are the encoded changes, each shared with every other stream that gets the same
change; a stream whose bounded queue fills is closed, its client resumes from history.
"""

from __future__ import annotations

import asyncio

from ..keys import Key


class Stream:
    """The mailbox of one watch stream: encoded lines, shared with every other stream that
    gets the same change. `None` in the queue means the stream is over."""

    __slots__ = ("address", "caller", "closed", "overflowed", "queue")

    def __init__(self, caller: Key, size: int, address: str | None = None) -> None:
        self.caller = caller
        self.address = address  # where the stream's client connects from (kick.py)
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(size)
        self.closed = False
        self.overflowed = False

    def offer(self, line: bytes) -> None:
        if self.closed:
            return
        try:
            self.queue.put_nowait(line)
        except asyncio.QueueFull:
            self.overflowed = True
            self.close()

    def close(self) -> None:
        """End the stream: what is still queued is dropped; the client resumes from history."""
        if self.closed:
            return
        self.closed = True
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(None)
