"""Fuzzing the UAPI `get` reply parser (wg/uapiget.py), and the client that reads it off the
socket (wg/uapi.py), with arbitrary bytes and mutated golden replies (docs/fuzzing.md).

A device's reply is a value or a `DeviceError`: `MalformedReply` for a broken one, or the
plain `DeviceError` that a well-formed `errno=N` (N != 0) line means. Nothing else, whatever
the bytes. The seeds are test_wg_uapi.py's golden replies. (test_wg_uapi.py fuzzes
`parse_get` with arbitrary text; these add bytes, mutations and the socket client.)
"""

from __future__ import annotations

import asyncio
import codecs
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from fuzzing import FUZZ, fuzz_input, mutated_lines
from test_wg_uapi import FULL_BLOCK, XPLATFORM_GET, get_reply, peer_block
from wgpunch.errors import DeviceError, MalformedReply
from wgpunch.keys import Key
from wgpunch.wg.uapi import UapiDevice
from wgpunch.wg.uapiget import (
    GetCutter,
    parse_device_lines,
    parse_get,
    parse_peer,
    parse_peer_at,
    update_counters,
)

K1, K2 = Key(bytes([1]) * 32), Key(bytes([2]) * 32)
GOLDEN = [
    XPLATFORM_GET,
    get_reply(peer_block(K1, "192.0.2.1:1"), peer_block(K2, "[2001:db8::2]:2", rx=5)),
    get_reply(),
    f"public_key={FULL_BLOCK}\nerrno=0\n\n",
    "errno=0\n\n",
    "errno=-22\n\n",
]
SEEDS = [reply.encode() for reply in GOLDEN]
# Values that sit on a parser's edges: u16/u64 limits, signs, exponents, non-ASCII digits,
# bad keys and addresses, an empty value.
VALUES = [b"0", b"-1", b"65535", b"65536", b"18446744073709551615", b"18446744073709551616",
          b"1e3", "\u00b2".encode(), b"", b"0" * 64, b"f" * 63, b"[::1%eth0]:1", b"1.2.3.4:0",
          b"10.0.0.1/33", b"::/0", b"999999999", b"1000000000", b"\xff\xfe", b"=", b"errno=0"]
REPLIES = fuzz_input(SEEDS, max_size=600) | mutated_lines(SEEDS, VALUES)


def allowed(error: DeviceError) -> bool:
    """A broken reply, or a well-formed errno line other than 0."""
    return isinstance(error, MalformedReply) or (error.errno > 0 and "failed: errno" in str(error))


def decode(data: bytes) -> str:
    """As UapiDevice reads a reply: UTF-8, or a MalformedReply."""
    try:
        return codecs.getincrementaldecoder("utf-8")().decode(data, final=True)
    except UnicodeDecodeError:
        raise MalformedReply("uapi: wgt0: reply is not UTF-8 text") from None


@FUZZ
@given(REPLIES, st.lists(st.integers(0, 700), max_size=6))
def test_any_reply_is_a_snapshot_or_a_device_error(data, cuts):
    """parse_get on the whole reply; and the pieces path of `changes`: the cutter fed in
    pieces, the device lines, every block on its own, and a block against the golden
    FULL_BLOCK as the previous reply's (counters only)."""
    try:
        text = decode(data)
        state, _ = parse_get(text, "wgt0")
        event(f"parsed, {min(len(state.peers), 3)} peers")
    except DeviceError as error:
        assert allowed(error), repr(error)
        event(type(error).__name__)
        text = data.decode("utf-8", errors="replace")
    cutter = GetCutter("wgt0")
    points = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    try:
        blocks = [block for piece in pieces for block in cutter.feed(piece)] + cutter.finish()
        parse_device_lines(cutter.head, "wgt0")
        for block in blocks:
            parse_peer_at(cutter.head, blocks, block, "wgt0")
    except DeviceError as error:
        assert allowed(error), repr(error)
    previous, _ = parse_peer(FULL_BLOCK, "wgt0", 1)
    block = text.removeprefix("public_key=").partition("\nerrno=")[0]
    made = update_counters(previous, FULL_BLOCK, block)
    if made is not None:  # only counters differ: the full parse makes the same peer
        assert made == parse_peer(block, "wgt0", 1)[0]


@pytest.fixture(scope="module")
def device() -> Iterator[tuple[asyncio.AbstractEventLoop, list[bytes], Path]]:
    """A throwaway UAPI server that answers each connection with the next reply queued."""
    loop = asyncio.new_event_loop()
    queue: list[bytes] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\n\n")
        writer.write(queue.pop(0))
        await writer.drain()
        writer.close()

    with tempfile.TemporaryDirectory() as directory:
        server = loop.run_until_complete(
            asyncio.start_unix_server(on_connect, path=str(Path(directory) / "wgt0.sock")))
        try:
            yield loop, queue, Path(directory)
        finally:
            server.close()
            loop.run_until_complete(server.wait_closed())
            loop.close()


@FUZZ
@given(REPLIES)
def test_the_socket_client_reads_any_reply_to_a_value_or_a_device_error(device, data):
    """UapiDevice.state and .changes (after a golden first read, so that blocks are compared
    and counters taken over) on the reply's bytes as they come off the socket."""
    loop, queue, directory = device
    uapi = UapiDevice("wgt0", directory=directory)
    queue.extend([SEEDS[1], data, data])
    loop.run_until_complete(uapi.changes())
    for read in (uapi.state, uapi.changes):
        try:
            loop.run_until_complete(read())
        except DeviceError as error:
            assert allowed(error), repr(error)
    assert not queue
