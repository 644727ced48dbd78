"""Connections to the API (site.py, connlimit.py) over real loopback sockets: caps, timeouts,
the accept loop when file descriptors run out. Timings and limits are made small, so that each
limit shows within a second.

As in test_registry_api.py, peer A is 127.0.0.1 and B 127.0.0.2; the registry listens on
127.0.0.1, so a client bound to 127.0.0.1 is A, and one bound to 127.0.0.9 a stranger (no
peer's address, and not the address it connected to). The limits (Limits) and their reasons
are in registry/limits.py and timings.py.
"""

import asyncio
import contextlib
import errno
import logging
import resource
import socket
import time

import pytest

from test_registry_api import QUIET, Registry, start, table
from wgpunch.registry.appkeys import CONNECTIONS
from wgpunch.registry.connlimit import fd_capacity, raise_fd_limit
from wgpunch.registry.limits import Limits
from wgpunch.registry.site import ApiSite, Listener
from wgpunch.registry.state import RegistryState
from wgpunch.registry.timings import Timings

FAST = Timings(heartbeat_s=30.0, punch_coalesce_s=30.0, head_timeout_s=0.3,
               idle_timeout_s=0.6, body_timeout_s=0.3)
PATIENT = Timings(heartbeat_s=30.0, punch_coalesce_s=30.0)  # connections held open stay
STRANGER = "127.0.0.9"
GET = b"GET /v1/peers HTTP/1.1\r\nHost: x\r\n\r\n"


async def registry_with(timings: Timings = FAST, **limits) -> Registry:
    state = RegistryState(epoch="e1")
    state.observe(table())
    return await start(state, timings, limits=Limits(**limits))


class Conn:
    """A raw client connection, to send exactly what a test needs."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, reg: Registry, source: str = "127.0.0.1") -> "Conn":
        reader, writer = await asyncio.open_connection(reg.host, reg.port,
                                                       local_addr=(source, 0))
        return cls(reader, writer)

    async def answer(self, within_s: float = 3.0) -> bytes:
        """One answer (head and JSON body), or b"" when the registry closed the connection."""
        async with asyncio.timeout(within_s):
            try:
                head = await self.reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as short:
                return short.partial
            except ConnectionResetError:
                return b""
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            return head + await self.reader.readexactly(length)

    async def closed_within(self, limit_s: float) -> float:
        """Seconds until the registry closes the connection (it sends nothing meanwhile)."""
        started = time.monotonic()
        async with asyncio.timeout(limit_s):
            with contextlib.suppress(ConnectionResetError):
                assert await self.reader.read() == b""
        return time.monotonic() - started

    def close(self) -> None:
        self.writer.close()


async def refused_at_once(reg: Registry, source: str = "127.0.0.1") -> bool:
    """The registry closes (resets) a new connection from `source` before it sends a byte."""
    try:
        conn = await Conn.open(reg, source)
    except ConnectionResetError:
        return True  # the reset overtook our own connect (loopback is that quick)
    try:
        return await conn.closed_within(1.0) < 0.5
    finally:
        conn.close()


# -- timeouts -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("intent", "sent"), [
    ("nothing at all", b""),
    ("half a head", b"GET /v1/peers HTTP/1.1\r\nHost: x\r\n"),
])
async def test_a_head_that_does_not_arrive_in_time_closes_the_connection(intent, sent, caplog):
    reg = await registry_with()
    try:
        conn = await Conn.open(reg)
        conn.writer.write(sent)
        with caplog.at_level(logging.WARNING, logger="wgpunch.registry"):
            took = await conn.closed_within(2.0)
        assert 0.25 <= took <= 1.0, (intent, took)  # head_timeout_s = 0.3
        [line] = [r for r in caplog.records if r.event == "slow_request"]
        assert "no complete request head within 0.3 s" in line.getMessage()
        assert line.exc_info is None
        assert reg.app[CONNECTIONS].open == 0
    finally:
        await reg.close()


async def test_a_head_sent_slowly_is_closed_at_its_deadline_all_the_same():
    reg = await registry_with()
    try:
        conn = await Conn.open(reg)
        started = time.monotonic()
        for line in (b"GET /v1/peers HTTP/1.1\r\n", b"Host: x\r\n", b"X-A: 1\r\n", b"X-B: 1\r\n"):
            conn.writer.write(line)  # a byte of progress every 0.1 s resets nothing
            await asyncio.sleep(0.1)
        await conn.closed_within(2.0)
        assert time.monotonic() - started < 0.6
    finally:
        await reg.close()


async def test_an_idle_keep_alive_connection_is_closed_after_idle_timeout_not_before():
    reg = await registry_with()
    try:
        conn = await Conn.open(reg)
        for _ in range(2):  # two requests 0.4 s apart: more than the head timeout, less than idle
            conn.writer.write(GET)
            assert (await conn.answer()).startswith(b"HTTP/1.1 200 ")
            await asyncio.sleep(0.4)
        took = await conn.closed_within(2.0)
        assert 0.1 <= took <= 0.5  # idle_timeout_s = 0.6 after the last answer
    finally:
        await reg.close()


async def test_the_next_head_has_the_head_timeout_from_its_first_byte():
    reg = await registry_with()
    try:
        conn = await Conn.open(reg)
        conn.writer.write(GET)
        assert (await conn.answer()).startswith(b"HTTP/1.1 200 ")
        conn.writer.write(b"G")
        took = await conn.closed_within(2.0)
        assert took < 0.5  # head_timeout_s = 0.3, not idle_timeout_s = 0.6
    finally:
        await reg.close()


async def test_a_body_that_does_not_arrive_in_time_is_a_json_408():
    reg = await registry_with()
    try:
        conn = await Conn.open(reg)
        conn.writer.write(b"PUT /v1/self HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        answer = await conn.answer()
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b'{"error":"body: not complete within 0.3 s"}' in answer
        assert await conn.closed_within(1.0) < 1.0
    finally:
        await reg.close()


# -- caps ---------------------------------------------------------------------------------------

async def test_a_caller_over_its_connection_cap_is_refused_at_once_and_others_are_served(
        caplog):
    reg = await registry_with(PATIENT, caller_connections=3)
    try:
        held = [await Conn.open(reg) for _ in range(3)]  # A's three, sending nothing
        with caplog.at_level(logging.WARNING, logger="wgpunch.registry"):
            assert await refused_at_once(reg)
        [line] = [r for r in caplog.records if r.event == "connection_refused"]
        assert "3 connections of this caller open, at most 3" in line.getMessage()
        b = await Conn.open(reg, "127.0.0.2")
        b.writer.write(GET)
        assert (await b.answer()).startswith(b"HTTP/1.1 200 ")
        held[0].close()  # a place of A's frees up
        await asyncio.sleep(0.05)
        again = await Conn.open(reg)
        again.writer.write(GET)
        assert (await again.answer()).startswith(b"HTTP/1.1 200 ")
    finally:
        await reg.close()


async def test_strangers_share_a_few_connections_and_get_one_request_each():
    reg = await registry_with(PATIENT, source_connections=2, stranger_connections=3)
    try:
        first = [await Conn.open(reg, STRANGER) for _ in range(2)]
        assert await refused_at_once(reg, STRANGER)  # its source's cap
        other = await Conn.open(reg, "127.0.0.10")  # the third stranger place
        assert await refused_at_once(reg, "127.0.0.11")  # all strangers' cap
        other.writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await other.answer()
        assert answer.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in answer
        assert await other.closed_within(1.0) < 0.5
        first[0].writer.write(GET)
        answer = await first[0].answer()
        assert answer.startswith(b"HTTP/1.1 403 ") and b"Connection: close" in answer
        a = await Conn.open(reg)  # peers are not counted with strangers
        a.writer.write(GET)
        assert (await a.answer()).startswith(b"HTTP/1.1 200 ")
    finally:
        await reg.close()


async def test_a_full_table_stops_accepting_and_a_waiting_connection_is_served_later(caplog):
    reg = await registry_with(PATIENT)
    reg.app[CONNECTIONS].capacity = 3  # what fitting to the fd limit would have left
    try:
        held = [await Conn.open(reg, "127.0.0.2") for _ in range(3)]
        waiting = await Conn.open(reg)  # TCP completes in the kernel's backlog
        waiting.writer.write(GET)
        with caplog.at_level(logging.WARNING, logger="wgpunch.registry"), \
                pytest.raises(TimeoutError):
            await waiting.answer(within_s=0.2)  # not accepted, not refused either
        assert [r.event for r in caplog.records] == ["connections_full"]
        held[0].close()
        answer = await waiting.answer()
        assert answer.startswith(b"HTTP/1.1 200 "), answer
    finally:
        await reg.close()


# -- the accept loop and file descriptors -----------------------------------------------------

class NoFiles(socket.socket):
    """A listening socket whose accept() fails as on a process out of file descriptors."""

    fails = 0

    def accept(self):
        NoFiles.fails += 1
        raise OSError(errno.EMFILE, "Too many open files")


async def test_accept_without_file_descriptors_backs_off_and_logs_one_line(caplog):
    reg = await registry_with(Timings(accept_retry_s=0.2))
    sock = NoFiles(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.setblocking(False)
    listener = Listener(sock, reg.app, reg.runner.server)
    client = socket.create_connection(sock.getsockname())  # readable from now on
    try:
        with caplog.at_level(logging.WARNING, logger="wgpunch.registry"):
            listener.start()
            await asyncio.sleep(0.5)
        assert 2 <= NoFiles.fails <= 4  # once at once, then every 0.2 s: not a busy loop
        assert [r.event for r in caplog.records] == ["accept_failed"]
        assert not any(r.exc_info for r in caplog.records)
    finally:
        listener.close()
        client.close()
        await reg.close()


@pytest.mark.parametrize(("intent", "soft", "in_use", "want"), [
    ("the usual 1024: less what is open and the reserve", 1024, 9, 1024 - 9 - 256),
    ("a raised limit: the table's own maximum", 1 << 20, 50, 32768),
    ("a limit too low for the reserve: half of what is free", 200, 10, 95),
    ("nothing free: one all the same", 10, 20, 1),
])
def test_fd_capacity(intent, soft, in_use, want):
    assert fd_capacity(Limits().max_connections, soft, in_use, Limits().fd_reserve) == want, \
        intent


def test_the_soft_open_files_limit_is_raised_to_the_hard_one():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lower = min(soft, hard, 1024) - 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (lower, hard))
    try:
        assert raise_fd_limit() == (lower, hard, hard)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_the_site_fits_its_table_to_the_open_files_limit_and_says_so(caplog):
    with caplog.at_level(logging.INFO, logger="wgpunch.registry"):
        reg = await registry_with(QUIET)
    try:
        table_ = reg.app[CONNECTIONS]
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert table_.fitted and table_.capacity <= soft - Limits().fd_reserve
        assert [r for r in caplog.records if r.event == "connection_capacity"]
        second = ApiSite(reg.runner, "127.0.0.1", 0)  # a second address: fitted once only
        capacity = table_.capacity
        await second.start()
        assert table_.capacity == capacity
    finally:
        await reg.close()
