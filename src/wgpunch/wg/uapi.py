"""Userspace WireGuard (wireguard-go, boringtun, ...) over the UAPI text protocol.

The protocol (wireguard.com/xplatform): a client connects to `/var/run/wireguard/IF.sock`
and sends `get=1\\n\\n` or `set=1\\n` + `key=value` lines + `\\n`. The server answers
`key=value` lines (for get) and always ends with `errno=N\\n\\n`; wireguard-go sends negative
errnos. Keys are hex. Lines apply as they are read, so a `set` is not transactional: we
validate everything before sending, and `Device.configure` restores the peers it touched if
the server refuses part of it.

The codec (`parse_get`, `parse_errno`, `encode_set`) is pure; `UapiDevice` adds the socket,
one connection per operation, with a deadline on every read.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as errno_codes
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DeviceError, DeviceNotFound, MalformedReply, WgpunchError
from ..keys import Key, public_key
from .device import (
    Device,
    DeviceState,
    Endpoint,
    IPNetwork,
    PeerConfig,
    PeerState,
    handshake_time,
)
from .device import parse_allowed_ip as _parse_allowed_ip

SOCKET_DIR = Path("/var/run/wireguard")
# A 10,000-peer device answers `get` with about 3 MB; this bounds a runaway server.
MAX_REPLY_BYTES = 64 * 1024 * 1024
TIMEOUT_S = 5.0
PARSE_INLINE_MAX = 64 * 1024  # about 200 peers: parsing that much takes ~5 ms


# -- codec ------------------------------------------------------------------------------------


@dataclass
class _PeerBuilder:
    public_key: Key
    endpoint: Endpoint | None = None
    allowed_ips: list[IPNetwork] = field(default_factory=list)
    handshake_sec: int = 0
    handshake_nsec: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0
    keepalive: int = 0
    preshared_key: Key | None = None

    def build(self) -> PeerState:
        return PeerState(
            public_key=self.public_key,
            endpoint=self.endpoint,
            allowed_ips=tuple(self.allowed_ips),
            latest_handshake=handshake_time(self.handshake_sec, self.handshake_nsec),
            rx_bytes=self.rx_bytes,
            tx_bytes=self.tx_bytes,
            persistent_keepalive=self.keepalive,
            has_preshared_key=self.preshared_key is not None,
        )


def _lines(reply: str, ifname: str) -> Iterator[tuple[int, str, str]]:
    if not reply.endswith("\n\n"):
        raise MalformedReply(f"uapi: {ifname}: reply is truncated (no blank line at the end)")
    for number, line in enumerate(reply[:-2].split("\n"), start=1):
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise MalformedReply(f"uapi: {ifname}: line {number}: {line[:80]!r} is not key=value")
        yield number, key, value


def _int(value: str, number: int, key: str, ifname: str, bits: int = 64) -> int:
    if not value.isdigit() or int(value) >= 1 << bits:
        raise MalformedReply(
            f"uapi: {ifname}: line {number}: {key}={value[:40]!r} is not an unsigned "
            f"{bits}-bit integer"
        )
    return int(value)


def parse_errno(value: str, ifname: str, number: int = 0) -> int:
    """The positive errno of an `errno=` line; wireguard-go sends it negated."""
    text = value[1:] if value.startswith("-") else value
    if not text.isdigit():
        raise MalformedReply(f"uapi: {ifname}: line {number}: errno={value[:40]!r} is not a number")
    return int(text)


def parse_get(reply: str, ifname: str) -> tuple[DeviceState, dict[Key, Key]]:
    """Parse a complete `get=1` reply into a snapshot plus each peer's preshared key.

    Unknown keys are skipped, so a newer server does not break us. The private key is used
    only to derive the public key and is not kept.
    """
    device_public: Key | None = None
    listen_port = 0
    fwmark = 0
    peers: list[_PeerBuilder] = []
    status: int | None = None
    for number, key, value in _lines(reply, ifname):
        if status is not None:
            raise MalformedReply(f"uapi: {ifname}: line {number}: {key!r} after errno")
        try:
            if key == "errno":
                status = parse_errno(value, ifname, number)
            elif key == "public_key":
                peers.append(_PeerBuilder(Key.from_hex(value, what=f"line {number} public_key")))
            elif not peers:
                if key == "private_key":
                    private = Key.from_hex(value, what=f"line {number} private_key", secret=True)
                    device_public = None if private.is_zero() else public_key(private)
                elif key == "listen_port":
                    listen_port = _int(value, number, key, ifname, 16)
                elif key == "fwmark":
                    fwmark = _int(value, number, key, ifname, 32)
            else:
                _peer_line(peers[-1], number, key, value, ifname)
        except WgpunchError as error:
            if isinstance(error, MalformedReply):
                raise
            raise MalformedReply(f"uapi: {ifname}: {error}") from None
    if status is None:
        raise MalformedReply(f"uapi: {ifname}: reply has no errno line")
    if status != 0:
        raise _device_error(ifname, "get", status)
    secrets = {p.public_key: p.preshared_key for p in peers if p.preshared_key is not None}
    state = DeviceState(ifname, device_public, listen_port, fwmark, tuple(p.build() for p in peers))
    return state, secrets


def _peer_line(peer: _PeerBuilder, number: int, key: str, value: str, ifname: str) -> None:
    if key == "preshared_key":
        psk = Key.from_hex(value, what=f"line {number} preshared_key", secret=True)
        peer.preshared_key = None if psk.is_zero() else psk
    elif key == "endpoint":
        peer.endpoint = Endpoint.parse(value)
    elif key == "allowed_ip":
        peer.allowed_ips.append(_parse_allowed_ip(value))
    elif key == "last_handshake_time_sec":
        peer.handshake_sec = _int(value, number, key, ifname)
    elif key == "last_handshake_time_nsec":
        peer.handshake_nsec = _int(value, number, key, ifname)
        if peer.handshake_nsec >= 1_000_000_000:
            raise MalformedReply(f"uapi: {ifname}: line {number}: nanoseconds {value} >= 1e9")
    elif key == "rx_bytes":
        peer.rx_bytes = _int(value, number, key, ifname)
    elif key == "tx_bytes":
        peer.tx_bytes = _int(value, number, key, ifname)
    elif key == "persistent_keepalive_interval":
        peer.keepalive = _int(value, number, key, ifname, 16)


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
            raise _device_error(ifname, "set", status)
        return
    raise MalformedReply(f"uapi: {ifname}: empty reply to set")


def _device_error(ifname: str, operation: str, status: int) -> DeviceError:
    name = errno_codes.errorcode.get(status, "unknown error")
    reason = os.strerror(status) if name != "unknown error" else name
    return DeviceError(
        f"uapi: {ifname}: {operation} failed: errno {status} ({name}: {reason})", status
    )


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

    async def _exchange(self, request: str, operation: str) -> str:
        try:
            return await asyncio.wait_for(self._roundtrip(request), self.timeout_s)
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

    async def _roundtrip(self, request: str) -> str:
        reader, writer = await asyncio.open_unix_connection(str(self.path), limit=MAX_REPLY_BYTES)
        try:
            writer.write(request.encode())
            await writer.drain()
            try:
                data = await reader.readuntil(b"\n\n")
            except asyncio.IncompleteReadError as error:
                data = error.partial  # parsing reports it as truncated
            except asyncio.LimitOverrunError:
                raise MalformedReply(
                    f"uapi: {self.name}: reply larger than {MAX_REPLY_BYTES} bytes"
                ) from None
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedReply(f"uapi: {self.name}: reply is not UTF-8 text") from None

    async def _read(self) -> tuple[DeviceState, dict[Key, Key]]:
        reply = await self._exchange("get=1\n\n", "get")
        if len(reply) > PARSE_INLINE_MAX:
            # Parsing a large device takes long (10,000 peers: ~0.25 s); in a thread the event
            # loop keeps answering meanwhile (the GIL is handed over every few ms).
            return await asyncio.to_thread(parse_get, reply, self.name)
        return parse_get(reply, self.name)

    async def _write(self, changes: Sequence[PeerConfig]) -> None:
        parse_set_reply(await self._exchange(encode_set(changes), "set"), self.name)
