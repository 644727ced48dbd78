"""Userspace WireGuard (wireguard-go, boringtun, ...) over the UAPI text protocol.

The protocol (wireguard.com/xplatform): a client connects to `/var/run/wireguard/IF.sock`
and sends `get=1\\n\\n` or `set=1\\n` + `key=value` lines + `\\n`. The server answers
`key=value` lines (for get) and always ends with `errno=N\\n\\n`; wireguard-go sends negative
errnos. Keys are hex. Lines apply as they are read, so a `set` is not transactional: we
validate everything before sending, and `Device.configure` restores the peers it touched if
the server refuses part of it.

The codec is pure: `encode_set` and `parse_set_reply` here, the reply to `get` in
uapiget.py. `UapiDevice` adds the socket, one connection per operation, with a deadline on
every read.

Polling a large device (the registry reads its own every 0.2 s) is mostly re-reading peers
that did not change: a 10,000-peer reply is ~3.3 MB, and parsing all of it takes ~0.25 s of
Python. `UapiDevice.changes` therefore keeps the previous reply's peer blocks as text and
parses only the blocks that differ. The reply is cut into blocks and looked up piece by piece
as it arrives (`GetCutter`), with the event loop running between pieces: at 10,000 peers a
poll of an unchanged device costs ~10 ms of CPU, in steps well under a millisecond
(bench/dns.py). Most blocks that do differ differ in their traffic counters alone (every node
of a registry sends through its tunnel every ~2 s: ~1,000 blocks per poll at 10,000 nodes);
those are made from the peer's previous `PeerState` (`update_counters`), not parsed again.
The kept text includes preshared keys, as every reply does; it lives as long as the
`UapiDevice`.
"""

from __future__ import annotations

import asyncio
import codecs
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ..errors import DeviceError, DeviceNotFound, MalformedReply
from ..keys import Key
from .device import Device
from .model import DeviceChanges, DeviceState, PeerConfig, PeerState
from .uapiget import (
    GetCutter,
    Parsed,
    device_error,
    parse_device_lines,
    parse_errno,
    parse_get,
    parse_peer_at,
    update_counters,
)

SOCKET_DIR = Path("/var/run/wireguard")
# A 10,000-peer device answers `get` with about 3 MB; this bounds a runaway server.
MAX_REPLY_BYTES = 64 * 1024 * 1024
TIMEOUT_S = 5.0
PARSE_INLINE_MAX = 64 * 1024  # about 200 peers: parsing that much takes ~5 ms
# A reply is read and cut in pieces of this size, one per turn of the event loop: ~0.1 ms.
PIECE_BYTES = 64 * 1024
# How long `changes` works on changed peers before it lets the event loop run: a block parsed
# in full takes ~20 us, one whose counters alone moved ~7 us, so a count would fit only one.
PARSE_STEP_S = 0.001


# -- codec ------------------------------------------------------------------------------------


def _lines(reply: str, ifname: str) -> Iterator[tuple[int, str, str]]:
    if not reply.endswith("\n\n"):
        raise MalformedReply(f"uapi: {ifname}: reply is truncated (no blank line at the end)")
    for number, line in enumerate(reply[:-2].split("\n"), start=1):
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise MalformedReply(f"uapi: {ifname}: line {number}: {line[:80]!r} is not key=value")
        yield number, key, value


def parse_private_key(reply: str, ifname: str) -> Key | None:
    """Only the private key of a `get=1` reply (device lines come before the first peer)."""
    found = None
    for number, key, value in _lines(reply, ifname):
        if key == "private_key":
            found = Key.from_hex(value, what=f"line {number} private_key", secret=True)
        elif key == "errno" and value != "0":
            raise device_error(ifname, "get", parse_errno(value, ifname, number))
        elif key == "public_key":
            break
    return None if found is None or found.is_zero() else found


def encode_set(changes: Sequence[PeerConfig]) -> str:
    """The `set=1` request for validated peer changes, in order."""
    lines = ["set=1"]
    for change in changes:
        lines.append(f"public_key={change.public_key.hex()}")
        if change.remove:
            lines.append("remove=true")
            continue
        if change.update_only:
            lines.append("update_only=true")
        if change.preshared_key is not None:
            lines.append(f"preshared_key={change.preshared_key.hex()}")
        if change.endpoint is not None:
            lines.append(f"endpoint={change.endpoint}")
        if change.persistent_keepalive is not None:
            lines.append(f"persistent_keepalive_interval={change.persistent_keepalive}")
        if change.replace_allowed_ips:
            lines.append("replace_allowed_ips=true")
        for net in change.allowed_ips or ():
            lines.append(f"allowed_ip={net}")
    return "\n".join(lines) + "\n\n"


def parse_set_reply(reply: str, ifname: str) -> None:
    for number, key, value in _lines(reply, ifname):
        if key != "errno" or number != 1:
            raise MalformedReply(f"uapi: {ifname}: unexpected {key!r} in the reply to set")
        status = parse_errno(value, ifname, number)
        if status != 0:
            raise device_error(ifname, "set", status)
        return
    raise MalformedReply(f"uapi: {ifname}: empty reply to set")


# -- transport --------------------------------------------------------------------------------


def socket_path(ifname: str, directory: Path = SOCKET_DIR) -> Path:
    return directory / f"{ifname}.sock"


def list_devices(directory: Path = SOCKET_DIR) -> list[str]:
    """Userspace devices whose interface exists in this network namespace.

    The socket directory is shared by every namespace on the host, so a socket alone does
    not mean the interface is ours to show.
    """
    try:
        names = sorted(p.name[:-5] for p in directory.iterdir() if p.name.endswith(".sock"))
    except FileNotFoundError:
        return []
    return [name for name in names if interface_here(name)]


def interface_here(ifname: str) -> bool:
    try:
        socket.if_nametoindex(ifname)
    except OSError:
        return False
    return True


class UapiDevice(Device):
    backend = "uapi"

    def __init__(
        self, name: str, *, directory: Path = SOCKET_DIR, timeout_s: float = TIMEOUT_S
    ) -> None:
        super().__init__(name)
        self.path = socket_path(name, directory)
        self.timeout_s = timeout_s
        self._blocks: dict[str, None] | None = None  # the peer blocks `changes` read last
        # Those blocks by their first line (the key in hex), and what `changes` made of each.
        self._texts: dict[str, str] = {}
        self._peers: dict[str, PeerState] = {}
        # The blocks `state` read last, parsed: a block's text alone decides what it parses
        # to, so two reads at once (one in a thread) can only cost each other a reparse.
        self._parsed: Parsed = {}

    async def _exchange(self, request: str, operation: str) -> str:
        pieces: list[str] = []
        await self._stream(request, operation, pieces.append)
        return "".join(pieces)

    async def _stream(self, request: str, operation: str, take: Callable[[str], None]) -> None:
        """Send `request` and hand the reply to `take` piece by piece, as it arrives; errors
        are translated here."""
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._roundtrip(request, take)
        except TimeoutError:
            raise DeviceError(
                f"uapi: {self.name}: {operation}: no complete reply within {self.timeout_s:g} s"
            ) from None
        except (FileNotFoundError, ConnectionRefusedError):
            raise DeviceNotFound(f"uapi: no WireGuard device {self.name!r} ({self.path})") from None
        except OSError as error:
            raise DeviceError(
                f"uapi: {self.name}: {operation}: {error.strerror or error}", error.errno or 0
            ) from None

    async def private_key(self) -> Key | None:
        reply = await self._exchange("get=1\n\n", "get")
        return parse_private_key(reply, self.name)

    async def _roundtrip(self, request: str, take: Callable[[str], None]) -> None:
        """The reply ends with the only blank line in it, after which the server waits for
        the next request; or where the server hangs up (the parser then reports it as
        truncated). A reply read at once would hold the event loop for milliseconds per MB
        (copying, decoding, cutting), so the loop runs between pieces. The socket goes
        through the loop's `sock_*` calls, not a stream: a stream's transport, protocol and
        reader cost more than the exchange (0.35 against 0.19 ms of CPU to read a 100-peer
        device, which an idle agent does ~3 times a second: bench/agent_footprint.py)."""
        loop = asyncio.get_running_loop()
        decoder = codecs.getincrementaldecoder("utf-8")()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.setblocking(False)
            await loop.sock_connect(sock, str(self.path))
            await loop.sock_sendall(sock, request.encode())
            size, last = 0, b""
            while True:
                data = await loop.sock_recv(sock, PIECE_BYTES)
                done = not data or (last + data[-2:]).endswith(b"\n\n")
                size += len(data)
                if size > MAX_REPLY_BYTES:
                    raise MalformedReply(
                        f"uapi: {self.name}: reply larger than {MAX_REPLY_BYTES} bytes")
                try:
                    take(decoder.decode(data, final=done))
                except UnicodeDecodeError:
                    raise MalformedReply(
                        f"uapi: {self.name}: reply is not UTF-8 text") from None
                if done:
                    return
                last = data[-1:]
                await asyncio.sleep(0)  # `sock_recv` does not yield while data is waiting

    async def _read(self) -> tuple[DeviceState, dict[Key, Key]]:
        reply = await self._exchange("get=1\n\n", "get")
        if len(reply) > PARSE_INLINE_MAX:
            # Parsing a large device takes long (10,000 peers: ~0.25 s); in a thread the event
            # loop keeps answering meanwhile (the GIL is handed over every few ms).
            return await asyncio.to_thread(parse_get, reply, self.name, self._parsed)
        return parse_get(reply, self.name, self._parsed)

    async def changes(self) -> DeviceChanges:
        """As `Device.changes`, but only the peer blocks whose text is not in the previous
        reply are parsed, and of those whose counters alone moved only the counters (module
        docstring). Between two turns of the event loop there is at most a piece of the reply
        to cut and look up, or about `PARSE_STEP_S` of parsing."""
        complete = self._blocks is None
        known = self._blocks or {}
        cutter = GetCutter(self.name)
        # The reply's blocks in its order (for the line number of an error), as a dict with
        # no values: unlike a set or a list of 10,000 strings, the garbage collector does not
        # track it, so its collections do not walk it while the event loop waits.
        current: dict[str, None] = {}
        fresh: set[str] = set()  # the blocks not in the previous reply

        def take(new_blocks: list[str]) -> None:
            # C-speed dict and set operations only, and each block is looked up in `known`
            # as it arrives: comparing whole replies at the end would hold the event loop for
            # milliseconds (10,000 blocks of ~330 bytes, most equal to one in `known`).
            current.update(dict.fromkeys(new_blocks))
            fresh.update(set(new_blocks).difference(known))

        await self._stream("get=1\n\n", "get", lambda piece: take(cutter.feed(piece)))
        take(cutter.finish())
        public, listen_port, fwmark = parse_device_lines(cutter.head, self.name)
        # The first read keeps the reply's order; later ones, a set's (the order of
        # wireguard-go's replies means nothing: it changes from one reply to the next).
        changed: dict[str, PeerState] = {}
        texts: dict[str, str] = {}  # the blocks of `changed`
        step_ends = time.perf_counter() + PARSE_STEP_S
        for block in current if complete else fresh:
            if time.perf_counter() >= step_ends:
                await asyncio.sleep(0)
                step_ends = time.perf_counter() + PARSE_STEP_S
            name = _key_text(block)
            old_block, previous = self._texts.get(name), self._peers.get(name)
            peer = None
            if old_block is not None and previous is not None:
                peer = update_counters(previous, old_block, block)
            changed[name] = peer or parse_peer_at(cutter.head, current, block, self.name)
            texts[name] = block
        if changed:
            await asyncio.sleep(0)  # what follows lets go of the previous reply: ~1 ms
        # The previous reply's blocks that are gone belong to peers that changed (their new
        # blocks are in `fresh`) or left; counted, they tell whether any left at all.
        gone_count = len(known) - (len(current) - len(fresh))
        still_here = sum(name in self._texts for name in changed) if gone_count else 0
        left: set[str] = set()
        if gone_count > still_here:  # a peer left: rare, worth a comparison of the replies
            await asyncio.sleep(0)
            left = {_key_text(block) for block in set(known).difference(current)}
            left.difference_update(changed)
        # The keys' text of the peers that left was checked when their blocks were parsed.
        removed = tuple(Key.from_hex(name) for name in left)
        self._blocks = current
        if complete:
            self._peers, self._texts = changed, texts
        else:
            self._peers.update(changed)
            self._texts.update(texts)
            for name in left:
                del self._peers[name], self._texts[name]
        return DeviceChanges(self.name, public, listen_port, fwmark, tuple(changed.values()),
                             removed, complete)

    async def _write(self, changes: Sequence[PeerConfig]) -> None:
        parse_set_reply(await self._exchange(encode_set(changes), "set"), self.name)


def _key_text(block: str) -> str:
    """The key of a peer block (`GetCutter`) as text: its first line, in one case."""
    return block.partition("\n")[0].lower()
