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
(bench/dns.py). The kept text includes preshared keys, as every reply does; it lives as long
as the `UapiDevice`.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import socket
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ..errors import DeviceError, DeviceNotFound, MalformedReply
from ..keys import Key
from .device import Device, DeviceChanges, DeviceState, PeerConfig, PeerState
from .uapiget import (
    GetCutter,
    device_error,
    parse_device_lines,
    parse_errno,
    parse_get,
    parse_peer_at,
)

SOCKET_DIR = Path("/var/run/wireguard")
# A 10,000-peer device answers `get` with about 3 MB; this bounds a runaway server.
MAX_REPLY_BYTES = 64 * 1024 * 1024
TIMEOUT_S = 5.0
PARSE_INLINE_MAX = 64 * 1024  # about 200 peers: parsing that much takes ~5 ms
# A reply is read and cut in pieces of this size, one per turn of the event loop: ~0.1 ms.
PIECE_BYTES = 64 * 1024
# Changed peers parsed by `changes` between two turns of the event loop: 1-2 ms of parsing.
PARSE_SLICE = 50


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
    return [name for name in names if _interface_here(name)]


def _interface_here(ifname: str) -> bool:
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
        self._blocks: set[str] | None = None  # the peer blocks `changes` read last

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
        (copying, decoding, cutting), so the loop runs between pieces."""
        reader, writer = await asyncio.open_unix_connection(str(self.path), limit=PIECE_BYTES)
        decoder = codecs.getincrementaldecoder("utf-8")()
        try:
            writer.write(request.encode())
            await writer.drain()
            size, last = 0, b""
            while True:
                data = await reader.read(PIECE_BYTES)
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
                await asyncio.sleep(0)  # `read` does not yield while data is buffered
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _read(self) -> tuple[DeviceState, dict[Key, Key]]:
        reply = await self._exchange("get=1\n\n", "get")
        if len(reply) > PARSE_INLINE_MAX:
            # Parsing a large device takes long (10,000 peers: ~0.25 s); in a thread the event
            # loop keeps answering meanwhile (the GIL is handed over every few ms).
            return await asyncio.to_thread(parse_get, reply, self.name)
        return parse_get(reply, self.name)

    async def changes(self) -> DeviceChanges:
        """As `Device.changes`, but only the peer blocks whose text is not in the previous
        reply are parsed (module docstring). Between two turns of the event loop there is at
        most a piece of the reply to cut and look up, or `PARSE_SLICE` peers to parse."""
        complete = self._blocks is None
        known = self._blocks or set()
        cutter = GetCutter(self.name)
        blocks: list[str] = []  # in the reply's order, for the line number of an error
        current: set[str] = set()

        def take(new_blocks: list[str]) -> None:  # C-speed list and set operations only
            blocks.extend(new_blocks)
            current.update(new_blocks)

        await self._stream("get=1\n\n", "get", lambda piece: take(cutter.feed(piece)))
        take(cutter.finish())
        public, listen_port, fwmark = parse_device_lines(cutter.head, self.name)
        # The first read keeps the reply's order; later ones, a set's (the order of
        # wireguard-go's replies means nothing: it changes from one reply to the next).
        fresh = blocks if complete else list(current - known)
        changed: list[PeerState] = []
        for start in range(0, len(fresh), PARSE_SLICE):
            await asyncio.sleep(0)
            changed += [parse_peer_at(cutter.head, blocks, block, self.name)
                        for block in fresh[start:start + PARSE_SLICE]]
        removed: tuple[Key, ...] = ()
        if len(current) - len(fresh) < len(known):
            # Some blocks of the previous reply are gone: each belonged to a peer that changed
            # (and is in `changed`) or left. Told apart by their keys' text, checked when
            # they were parsed.
            gone = {block.partition("\n")[0].lower() for block in known - current}
            gone.difference_update(peer.public_key.hex() for peer in changed)
            removed = tuple(Key.from_hex(text) for text in gone)
        self._blocks = current
        return DeviceChanges(self.name, public, listen_port, fwmark, tuple(changed), removed,
                             complete)

    async def _write(self, changes: Sequence[PeerConfig]) -> None:
        parse_set_reply(await self._exchange(encode_set(changes), "set"), self.name)
