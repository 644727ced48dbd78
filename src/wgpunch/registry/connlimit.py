"""Who may hold how many of the API's connections, and for how long without a request.

- `classify` names the client of a new connection from its addresses alone, before a byte is
  read: a caller (a peer: the source lies in the allowed IPs of exactly one peer), this host
  (the source is the address it connected to), or a stranger.
- `ConnectionTable` admits or refuses it: the table's capacity (fitted to the open-files
  limit, `fit_fd_limit`), connections per caller, per source, and for all strangers together
  (Limits). A refused connection is closed at once (site.py).
- `Guard` stands between an admitted connection's transport and aiohttp's protocol: it
  forwards every call, frees the connection's place when it ends, and aborts a connection
  whose request head does not arrive in time or that stays idle too long (Timings). The API's
  outermost middleware tells it when a request starts and ends.
"""

from __future__ import annotations

import asyncio
import enum
import os
import resource
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from ..keys import Key
from ..wg.model import IPAddress
from .limits import Limits
from .timings import Timings


class Kind(enum.Enum):
    CALLER = "caller"  # a peer of the registry, identified by its tunnel address
    LOCAL = "this host"  # connected from the address it connected to
    STRANGER = "stranger"  # anyone else: gets /healthz and 403s only


@dataclass(frozen=True, slots=True)
class Client:
    kind: Kind
    key: Hashable  # what the per-client cap counts: the caller's Key, or the source address
    source: IPAddress


def classify(source: IPAddress, local: IPAddress | None,
             identify: Callable[[IPAddress], Key | None]) -> Client:
    key = identify(source)
    if key is not None:
        return Client(Kind.CALLER, key, source)
    if source == local:
        return Client(Kind.LOCAL, source, source)
    return Client(Kind.STRANGER, source, source)


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str
    event: str  # what the log calls it


class Slot:
    """One admitted connection's place in the table; `release` frees it (once)."""

    __slots__ = ("_table", "client")

    def __init__(self, table: ConnectionTable, client: Client) -> None:
        self._table: ConnectionTable | None = table
        self.client = client

    def release(self) -> None:
        table, self._table = self._table, None
        if table is not None:
            table._release(self.client)


class ConnectionTable:
    """The open API connections, counted per client. Plain methods only: nothing
    interleaves with a change."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.capacity = limits.max_connections  # lowered to what file descriptors allow
        self.fitted = False  # capacity fitted to the open-files limit (site.py, once)
        self.open = 0
        self._per_client: Counter[Hashable] = Counter()
        self._strangers = 0
        self._waiting: list[Callable[[], None]] = []  # listeners that stopped: table full

    @property
    def full(self) -> bool:
        return self.open >= self.capacity

    def count(self, key: Hashable) -> int:
        return self._per_client[key]

    def admit(self, client: Client) -> Slot | Refusal:
        if self.full:
            return Refusal(f"{self.open} API connections open, at most {self.capacity}",
                           event="connection_refused")
        cap = (self.limits.caller_connections if client.kind is Kind.CALLER
               else self.limits.source_connections)
        held = self._per_client[client.key]
        if held >= cap:
            return Refusal(f"{held} connections of this {client.kind.value} open, at most {cap}",
                           event="connection_refused")
        if client.kind is Kind.STRANGER:
            if self._strangers >= self.limits.stranger_connections:
                return Refusal(f"{self._strangers} connections of sources that are no peer's "
                               f"open, at most {self.limits.stranger_connections}",
                               event="connection_refused")
            self._strangers += 1
        self._per_client[client.key] = held + 1
        self.open += 1
        return Slot(self, client)

    def when_room(self, callback: Callable[[], None]) -> None:
        """Call `callback` once, as soon as a place frees up (the table is full now)."""
        self._waiting.append(callback)

    def _release(self, client: Client) -> None:
        self.open -= 1
        left = self._per_client[client.key] - 1
        if left:
            self._per_client[client.key] = left
        else:
            del self._per_client[client.key]
        if client.kind is Kind.STRANGER:
            self._strangers -= 1
        if self._waiting and not self.full:
            waiting, self._waiting = self._waiting, []
            for callback in waiting:
                callback()


# -- file descriptors -----------------------------------------------------------------------


def fd_capacity(max_connections: int, soft_limit: int, in_use: int, reserve: int) -> int:
    """Connections the API may hold: the open-files limit less what is open and the reserve;
    with a limit too low for the reserve, half of what is free."""
    free = max(0, soft_limit - in_use)
    return max(1, min(max_connections, max(free - reserve, free // 2)))


def raise_fd_limit() -> tuple[int, int, int]:
    """Raise the soft open-files limit to the hard one (a process may, unprivileged);
    returns the soft limit before, after, and the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit still stops at the kernel's nr_open (1,048,576 by default).
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft, soft, hard
    return soft, target, hard


def open_fds() -> int:
    """File descriptors this process has open now (Linux: /proc/self/fd); 0 if unknown."""
    try:
        return max(0, len(os.listdir("/proc/self/fd")) - 1)  # less listdir's own
    except OSError:
        return 0


# -- one connection -------------------------------------------------------------------------


class Guard(asyncio.Protocol):
    """Forwards a transport's calls to aiohttp's protocol (`inner`), holds the connection's
    `Slot` until the connection is lost, and aborts it when it keeps us waiting:

    - a request head not complete within `head_timeout_s` of the connection's start, or of
      the first byte after the previous request;
    - no request at all for `idle_timeout_s` after the previous one.

    While a request is being handled (`request_started` .. `request_finished`) no timer runs:
    the handler bounds its own waits (body, stream writes)."""

    def __init__(self, inner: asyncio.Protocol, slot: Slot, timings: Timings,
                 on_timeout: Callable[[Client, str], None]) -> None:
        self._inner = inner
        self.slot = slot
        self._timings = timings
        self._on_timeout = on_timeout
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._waiting_for = "head"  # what the deadline is for: "head" or "idle"
        self._busy = 0  # requests being handled
        self._bytes_while_busy = False  # the next head started during a request

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._arm(self._loop.time() + self._timings.head_timeout_s, "head")
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._busy:
            self._bytes_while_busy = True
        elif self._waiting_for == "idle":  # the first byte of the next head
            self._arm(self._loop.time() + self._timings.head_timeout_s, "head")
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.slot.release()
        self._inner.connection_lost(exc)

    # -- told by the API's middleware ------------------------------------------------------

    def request_started(self) -> None:
        self._busy += 1
        self._bytes_while_busy = False

    def request_finished(self) -> None:
        self._busy -= 1
        if self._busy == 0 and self._transport is not None:
            if self._bytes_while_busy:
                self._arm(self._loop.time() + self._timings.head_timeout_s, "head")
            else:
                self._arm(self._loop.time() + self._timings.idle_timeout_s, "idle")

    # -- the timer -------------------------------------------------------------------------

    def _arm(self, deadline: float, what: str) -> None:
        self._deadline, self._waiting_for = deadline, what
        if self._timer is not None and self._timer.when() <= deadline:
            return  # fires first; _check then waits on for the later deadline
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(deadline, self._check)

    def _check(self) -> None:
        self._timer = None
        if self._busy or self._transport is None:
            return
        if self._loop.time() < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._check)
            return
        self._on_timeout(self.slot.client, self._waiting_for)
        self._transport.abort()
