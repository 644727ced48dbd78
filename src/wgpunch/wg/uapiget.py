"""The reply to a UAPI `get=1` (wireguard.com/xplatform): the device's lines, then a block of
lines per peer, each block starting with `public_key=`, then `errno=N` and a blank line.

`parse_get` turns a whole reply into a snapshot. `GetCutter` cuts a reply into the device
lines and the peers' blocks as it arrives, piece by piece, so that `UapiDevice.changes`
(uapi.py) can compare blocks with the previous reply's and parse only those that differ
(`parse_peer_at`), or, for a block whose traffic counters or handshake time alone moved,
only those lines (`update_counters`). Unknown keys are skipped, so a newer server does not
break us; anything else that is wrong is a `MalformedReply` that names the interface and,
where it can, the line.
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import itertools
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ..errors import DeviceError, MalformedReply, WgpunchError
from ..keys import Key, public_key
from .model import DeviceState, Endpoint, IPNetwork, PeerState, handshake_time
from .model import parse_allowed_ip as _parse_allowed_ip

PEER_START = "\npublic_key="  # the line that starts a peer, after the previous line's end
NO_KEY_HEX = "0" * 64  # how wireguard-go shows an unset preshared key
# The lines of a peer block that move with traffic and handshakes: in a registry that every
# node keeps a stream open to, most changed blocks differ from their previous reply's only here.
COUNTER_KEYS = frozenset(
    {"rx_bytes", "tx_bytes", "last_handshake_time_sec", "last_handshake_time_nsec"})
HANDSHAKE_SEC, HANDSHAKE_NSEC = "last_handshake_time_sec=", "last_handshake_time_nsec="


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


def _int(value: str, number: int, key: str, ifname: str, bits: int = 64) -> int:
    if not (value.isascii() and value.isdigit()) or int(value) >= 1 << bits:
        raise MalformedReply(
            f"uapi: {ifname}: line {number}: {key}={value[:40]!r} is not an unsigned "
            f"{bits}-bit integer"
        )
    return int(value)


def parse_errno(value: str, ifname: str, number: int = 0) -> int:
    """The positive errno of an `errno=` line; wireguard-go sends it negated. `number` is
    the line's number, for the error message (0: the reply's last line)."""
    text = value[1:] if value.startswith("-") else value
    if not (text.isascii() and text.isdigit()):
        where = f"line {number}" if number else "last line"
        raise MalformedReply(f"uapi: {ifname}: {where}: errno={value[:40]!r} is not a number")
    return int(text)


Parsed = dict[str, tuple[PeerState, Key | None]]  # peer blocks and what they parse to


def parse_get(reply: str, ifname: str, parsed: Parsed | None = None
              ) -> tuple[DeviceState, dict[Key, Key]]:
    """Parse a complete `get=1` reply into a snapshot plus each peer's preshared key.

    With `parsed` (the blocks of an earlier reply), a block whose text is in it is not
    parsed again; `parsed` then holds this reply's blocks. An agent reads its device every
    second, and most blocks are as they were (no traffic, no handshake): 100 peers took
    ~70 % of an idle agent's CPU to parse (bench/agent_footprint.py --profile).

    Unknown keys are skipped, so a newer server does not break us. The private key is used
    only to derive the public key and is not kept.
    """
    cutter = GetCutter(ifname)
    blocks = cutter.feed(reply) + cutter.finish()
    public, listen_port, fwmark = parse_device_lines(cutter.head, ifname)
    peers: list[PeerState] = []
    secrets: dict[Key, Key] = {}
    number = first_peer_line(cutter.head)
    known = {} if parsed is None else parsed
    now: Parsed = {}
    for block in blocks:
        peer, psk = now[block] = known.get(block) or parse_peer(block, ifname, number)
        peers.append(peer)
        if psk is not None:
            secrets[peer.public_key] = psk
        number += block.count("\n") + 1
    if parsed is not None:
        parsed.clear()
        parsed.update(now)
    return DeviceState(ifname, public, listen_port, fwmark, tuple(peers)), secrets


class GetCutter:
    """Cuts a `get=1` reply, as it arrives piece by piece, into the device lines (`head`) and
    one block per peer: the text after `public_key=` up to the next peer. A block is complete
    once the next one starts, so each piece costs about its own length (10,000 peers, 3.3 MB:
    ~3 ms of cutting in all, spread over the pieces), and a caller can compare blocks with an
    earlier reply's before parsing any. The lines in a block are checked when it is parsed;
    `finish` checks how the reply ends.
    """

    __slots__ = ("_cut", "_since_cut", "_tail", "head", "ifname")

    def __init__(self, ifname: str) -> None:
        self.ifname = ifname
        self.head = ""  # the device lines, known once the first peer starts (or at the end)
        self._cut = False  # whether a peer has started
        self._since_cut: list[str] = []  # the text after the last cut, in pieces
        self._tail = ""  # the end of the text fed, where a separator may have begun

    def feed(self, piece: str) -> list[str]:
        """The peer blocks that `piece`, the next part of the reply, completes."""
        self._since_cut.append(piece)
        window = self._tail + piece
        self._tail = window[1 - len(PEER_START):]
        if PEER_START not in window:
            return []  # joined only once a cut is found: a long block costs its length once
        blocks = "".join(self._since_cut).split(PEER_START)
        self._since_cut = [blocks.pop()]
        if not self._cut:
            self._start(blocks)
        return blocks

    def finish(self) -> list[str]:
        """The last peer block (if any), once the reply is complete: it must end with the
        status line `errno=0` and a blank line."""
        text = "".join(self._since_cut)
        if not text.endswith("\n\n"):
            raise MalformedReply(
                f"uapi: {self.ifname}: reply is truncated (no blank line at the end)")
        # A newline in front: a reply that is only the status line is cut like any other.
        body, sep, status = ("\n" + text[:-2]).rpartition("\nerrno=")
        if not sep:
            raise MalformedReply(f"uapi: {self.ifname}: reply has no errno line at its end")
        value, newline, rest = status.partition("\n")
        if newline:
            raise MalformedReply(f"uapi: {self.ifname}: {rest.partition('=')[0][:80]!r} "
                                 "after the errno line")
        code = parse_errno(value, self.ifname)
        if code != 0:
            raise device_error(self.ifname, "get", code)
        blocks = [body[1:]]
        if not self._cut:
            self._start(blocks)
        return blocks

    def _start(self, blocks: list[str]) -> None:
        """`blocks[0]` is the text before the first cut: the device lines, or the first peer
        when there are none (the reply starts with `public_key=`)."""
        self._cut = True
        first = blocks[0]
        if first.startswith("public_key="):
            blocks[0] = first.removeprefix("public_key=")
        else:
            self.head = blocks.pop(0)


def parse_peer_at(head: str, blocks: Iterable[str], block: str, ifname: str) -> PeerState:
    """`block`, one of `blocks` (in order) of a reply whose device lines are `head`. Its line
    number in the reply is worked out only for an error message, which then reads as
    `parse_get`'s."""
    try:
        return parse_peer(block, ifname, 0)[0]
    except MalformedReply:
        before = itertools.takewhile(lambda other: other != block, blocks)
        number = first_peer_line(head) + sum(other.count("\n") + 1 for other in before)
        parse_peer(block, ifname, number)  # raises the same error, numbered
        raise


def update_counters(previous: PeerState, old_block: str, block: str) -> PeerState | None:
    """`block` as a `PeerState`, made from `previous` (the same peer's state, parsed from
    `old_block` of an earlier reply) when the two blocks differ only in counter lines
    (`COUNTER_KEYS`, each once in a block, as servers write them) and those hold valid
    values; otherwise None, and the caller parses `block` in full, which also names a bad
    line. This costs ~7 us a block, parsing it in full ~20 (a key, an endpoint, an allowed
    IP to build): at 10,000 active nodes, ~1,000 blocks a poll."""
    old_lines, lines = old_block.split("\n"), block.split("\n")
    if len(old_lines) != len(lines):
        return None
    rx, tx, handshake = previous.rx_bytes, previous.tx_bytes, previous.latest_handshake
    for old, line in zip(old_lines, lines, strict=True):
        if old == line:
            continue
        key, _, value = line.partition("=")
        if key not in COUNTER_KEYS or old.partition("=")[0] != key:
            return None
        number = _counter(value)
        if number is None:
            return None
        if key == "rx_bytes":
            rx = number
        elif key == "tx_bytes":
            tx = number
        else:  # either half of the handshake time: the new time needs both
            sec = _counter(_value_of(lines, HANDSHAKE_SEC))
            nsec = _counter(_value_of(lines, HANDSHAKE_NSEC))
            if sec is None or nsec is None or nsec >= 1_000_000_000:
                return None
            handshake = handshake_time(sec, nsec)
    return PeerState(previous.public_key, previous.endpoint, previous.allowed_ips, handshake,
                     rx, tx, previous.persistent_keepalive, previous.has_preshared_key)


def _counter(value: str | None) -> int | None:
    """An unsigned 64-bit value, or None where `_int` would raise."""
    if value is None or not (value.isascii() and value.isdigit()) or len(value) > 20:
        return None
    number = int(value)
    return number if number < 1 << 64 else None


def _value_of(lines: list[str], prefix: str) -> str | None:
    for line in lines:
        if line.startswith(prefix):
            return line[len(prefix):]
    return None


def first_peer_line(head: str) -> int:
    """The line number of the first peer's public_key, after the device lines `head`."""
    return head.count("\n") + 2 if head else 1


def parse_device_lines(head: str, ifname: str) -> tuple[Key | None, int, int]:
    """The device's public key (derived from the private key), listen port and fwmark, from
    the lines before the first peer (`GetCutter.head`)."""
    public: Key | None = None
    listen_port = fwmark = 0
    with _malformed(ifname):
        for number, key, value in _key_values(head.split("\n") if head else [], 1, ifname):
            if key == "private_key":
                private = Key.from_hex(value, what=f"line {number} private_key", secret=True)
                public = None if private.is_zero() else public_key(private)
            elif key == "listen_port":
                listen_port = _int(value, number, key, ifname, 16)
            elif key == "fwmark":
                fwmark = _int(value, number, key, ifname, 32)
    return public, listen_port, fwmark


def parse_peer(block: str, ifname: str, number: int) -> tuple[PeerState, Key | None]:
    """One peer block (`GetCutter`) and its preshared key; `number` is the line of its
    public_key in the reply, for error messages."""
    hex_key, *lines = block.split("\n")
    with _malformed(ifname):
        peer = _PeerBuilder(Key.from_hex(hex_key, what=f"line {number} public_key"))
        for line_number, key, value in _key_values(lines, number + 1, ifname):
            _peer_line(peer, line_number, key, value, ifname)
    return peer.build(), peer.preshared_key


def _key_values(lines: list[str], first: int, ifname: str) -> Iterator[tuple[int, str, str]]:
    """(line number, key, value) of the lines of one part of a reply, the first numbered
    `first`. The status line ends a reply: an `errno` before it is malformed."""
    for number, line in enumerate(lines, start=first):
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise MalformedReply(f"uapi: {ifname}: line {number}: {line[:80]!r} is not key=value")
        if key == "errno":
            raise MalformedReply(f"uapi: {ifname}: line {number}: errno before the last line")
        yield number, key, value


@contextlib.contextmanager
def _malformed(ifname: str) -> Iterator[None]:
    """A bad value in a reply (a key, an endpoint, a CIDR) is a `MalformedReply` that names
    the interface, whichever parser found it."""
    try:
        yield
    except MalformedReply:
        raise
    except WgpunchError as error:
        raise MalformedReply(f"uapi: {ifname}: {error}") from None


def _peer_line(peer: _PeerBuilder, number: int, key: str, value: str, ifname: str) -> None:
    if key == "preshared_key":
        if value == NO_KEY_HEX:  # most peers: no key to check and make
            peer.preshared_key = None
            return
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


def device_error(ifname: str, operation: str, status: int) -> DeviceError:
    """What a reply's `errno=N` (N != 0) means, for `get` here and `set` in uapi.py."""
    name = errno_codes.errorcode.get(status, "unknown error")
    reason = os.strerror(status) if name != "unknown error" else name
    return DeviceError(
        f"uapi: {ifname}: {operation} failed: errno {status} ({name}: {reason})", status
    )
