"""UDP to one rendezvous server from a local port that another socket (WireGuard) owns.

A natpunch server records the source `ip:port` of a request as the node's public endpoint, so
the request must leave from the WireGuard listen port: only then does the NAT map it exactly
as it maps WireGuard's own packets. WireGuard owns that port, so we cannot bind it. As in both
reference clients (reference/natpunch.md), we send whole IPv4+UDP datagrams on a raw socket
(IPPROTO_RAW, which implies IP_HDRINCL) and read the server's replies on a raw IPPROTO_UDP
socket. The kernel gives such a socket a copy of every UDP datagram the host receives, before
and besides the copy it gives the owning UDP socket, so WireGuard still receives everything
on its port; a classic BPF filter keeps the copies down to the server's replies.

Differences from the references: the filter takes the IP header length from IHL instead of
assuming 20 bytes, so replies carrying IP options are not missed; every packet is checked
again in user space (the filter is attached after the socket starts queueing, and a filter
is no parser); a receive has a timeout.

IPv4 only, because both natpunch protocols are (their servers listen on IPv4 and a reply
carries a 4-byte address). Not because a raw socket cannot do IPv6: a raw IPv6 IPPROTO_UDP
socket takes a hand-written UDP header, source port included, and the kernel fills in its
checksum when asked with IPV6_CHECKSUM (RFC 3542); and an IPv6 IPPROTO_RAW socket comes with
IPV6_HDRINCL on, an option Python's socket module does not name but get/setsockopt take as
36. Both checked on Linux 6.18 in a network namespace.

Both sockets need CAP_NET_RAW.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import socket
import struct
from types import TracebackType

from ..errors import CapabilityError, WgpunchError
from ..wg.model import Endpoint

_IPPROTO_UDP = 17
_IP_HEADER = 20  # without options
_UDP_HEADER = 8
_MAX_IPV4 = 65535  # the IPv4 total-length field is 16 bits
# Flags and fragment offset word: MF (0x2000) and the 13-bit offset. A datagram the kernel
# has reassembled has both clear; DF (0x4000) may be set and does not matter.
_FRAGMENT_BITS = 0x3FFF
# <asm-generic/socket.h>; the same number on every architecture except parisc, which Python's
# socket module does not name.
_SO_ATTACH_FILTER = 26

# Classic BPF opcodes (<linux/filter.h>), only the ones the reply filter uses.
_BPF_LD_B_ABS = 0x30  # A = packet[k]
_BPF_LD_H_ABS = 0x28  # A = packet[k:k+2], big-endian
_BPF_LD_W_ABS = 0x20  # A = packet[k:k+4], big-endian
_BPF_LD_H_IND = 0x48  # A = packet[X+k:X+k+2], big-endian
_BPF_LD_W_IND = 0x40  # A = packet[X+k:X+k+4], big-endian
_BPF_LDX_B_MSH = 0xB1  # X = 4 * (packet[k] & 0xf): the IPv4 header length
_BPF_ALU_AND_K = 0x54  # A &= k
_BPF_JMP_JEQ_K = 0x15  # pc += jt if A == k else jf
_BPF_JMP_JSET_K = 0x45  # pc += jt if A & k else jf
_BPF_RET_K = 0x06  # accept k bytes of the packet (0: drop it)


def checksum(data: bytes) -> int:
    """RFC 1071 Internet checksum."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_datagram(src: str, sport: int, dst: str, dport: int, payload: bytes, ttl: int) -> bytes:
    """An IPv4 header plus UDP header plus payload, both checksums filled in."""
    length = _UDP_HEADER + len(payload)
    src_b, dst_b = socket.inet_aton(src), socket.inet_aton(dst)
    pseudo = src_b + dst_b + struct.pack("!BBH", 0, _IPPROTO_UDP, length)
    udp = struct.pack("!HHHH", sport, dport, length, 0) + payload
    udp_sum = checksum(pseudo + udp) or 0xFFFF  # RFC 768: a computed zero is sent as all ones
    udp = udp[:6] + struct.pack("!H", udp_sum) + udp[8:]
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, _IP_HEADER + length, 0, 0x4000, ttl,
                         _IPPROTO_UDP, 0, src_b, dst_b)
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + udp


def source_address(dst: Endpoint) -> str:
    """The address the kernel would send from toward `dst` (a route lookup, no packet)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((str(dst.ip), dst.port))
        address: str = sock.getsockname()[0]
        return address


def reply_filter(server_ip: ipaddress.IPv4Address, server_port: int,
                 local_port: int) -> list[tuple[int, int, int, int]]:
    """A classic BPF program accepting only UDP from `server_ip:server_port` to `local_port`.

    Runs on a raw IPv4 socket, where the packet starts at the IP header. Fragments are
    rejected, first ones (MF set, offset 0) included: the kernel reassembles a datagram before
    it hands it to raw sockets, so a fragment seen here is never a whole reply, and a first
    fragment would fail the user-space UDP length check anyway. Loads past the end of the
    packet make the kernel drop it, so a truncated packet needs no check of its own.
    """
    reject = -1  # placeholder jump target, resolved below to the final `ret #0`
    program: list[tuple[int, int, int, int]] = [
        (_BPF_LD_B_ABS, 0, 0, 0),  # version and IHL
        (_BPF_ALU_AND_K, 0, 0, 0xF0),
        (_BPF_JMP_JEQ_K, 0, reject, 0x40),  # IPv4
        (_BPF_LD_B_ABS, 0, 0, 9),
        (_BPF_JMP_JEQ_K, 0, reject, _IPPROTO_UDP),
        (_BPF_LD_H_ABS, 0, 0, 6),
        (_BPF_JMP_JSET_K, reject, 0, _FRAGMENT_BITS),  # a fragment
        (_BPF_LD_W_ABS, 0, 0, 12),
        (_BPF_JMP_JEQ_K, 0, reject, int(server_ip)),  # source address
        (_BPF_LDX_B_MSH, 0, 0, 0),  # X = header length, options included
        (_BPF_LD_H_IND, 0, 0, 0),
        (_BPF_JMP_JEQ_K, 0, reject, server_port),  # UDP source port
        (_BPF_LD_H_IND, 0, 0, 2),
        (_BPF_JMP_JEQ_K, 0, reject, local_port),  # UDP destination port
        (_BPF_RET_K, 0, 0, 0xFFFF),  # the whole packet: an IPv4 datagram is at most 65535 bytes
    ]
    return _resolve(program, reject)


def magic_filter(local_port: int, payload_size: int, magic: bytes
                 ) -> list[tuple[int, int, int, int]]:
    """A classic BPF program accepting only whole UDP datagrams to `local_port` from anyone
    whose payload is `payload_size` bytes and starts with the 4-byte `magic` (node/upgrade.py's
    probes). Fragments are rejected as in `reply_filter`."""
    reject = -1
    program: list[tuple[int, int, int, int]] = [
        (_BPF_LD_B_ABS, 0, 0, 0),
        (_BPF_ALU_AND_K, 0, 0, 0xF0),
        (_BPF_JMP_JEQ_K, 0, reject, 0x40),  # IPv4
        (_BPF_LD_B_ABS, 0, 0, 9),
        (_BPF_JMP_JEQ_K, 0, reject, _IPPROTO_UDP),
        (_BPF_LD_H_ABS, 0, 0, 6),
        (_BPF_JMP_JSET_K, reject, 0, _FRAGMENT_BITS),
        (_BPF_LDX_B_MSH, 0, 0, 0),
        (_BPF_LD_H_IND, 0, 0, 2),
        (_BPF_JMP_JEQ_K, 0, reject, local_port),  # UDP destination port
        (_BPF_LD_H_IND, 0, 0, 4),
        (_BPF_JMP_JEQ_K, 0, reject, _UDP_HEADER + payload_size),  # UDP length
        (_BPF_LD_W_IND, 0, 0, _UDP_HEADER),
        (_BPF_JMP_JEQ_K, 0, reject, int.from_bytes(magic, "big")),
        (_BPF_RET_K, 0, 0, 0xFFFF),
    ]
    return _resolve(program, reject)


def _resolve(program: list[tuple[int, int, int, int]], reject: int
             ) -> list[tuple[int, int, int, int]]:
    """Jumps to `reject` made relative jumps to a final `ret #0`."""
    reject_at = len(program)
    program = [*program, (_BPF_RET_K, 0, 0, 0)]
    return [
        (code,
         reject_at - index - 1 if jt == reject else jt,
         reject_at - index - 1 if jf == reject else jf,
         k)
        for index, (code, jt, jf, k) in enumerate(program)
    ]


def udp_payload(packet: bytes) -> tuple[Endpoint, int, bytes] | None:
    """(source, destination port, UDP payload) of a whole IPv4 UDP datagram read from a raw
    socket, else None; never raises. The checksum is not verified (see `_reply_payload`)."""
    if len(packet) < _IP_HEADER or packet[0] >> 4 != 4:
        return None
    header_length = (packet[0] & 0x0F) * 4
    total_length, fragment, protocol = struct.unpack_from("!H2xHxB", packet, 2)
    if (header_length < _IP_HEADER or header_length + _UDP_HEADER > total_length
            or total_length > len(packet) or protocol != _IPPROTO_UDP
            or fragment & _FRAGMENT_BITS):
        return None
    sport, dport, udp_length = struct.unpack_from("!HHH", packet, header_length)
    if sport == 0 or not _UDP_HEADER <= udp_length <= total_length - header_length:
        return None
    source = Endpoint(ipaddress.IPv4Address(packet[12:16]), sport)
    return source, dport, packet[header_length + _UDP_HEADER:header_length + udp_length]


def filtered_socket(program: list[tuple[int, int, int, int]]) -> socket.socket:
    """A non-blocking raw IPv4 UDP socket that takes only what `program` accepts (CAP_NET_RAW;
    else CapabilityError)."""
    sock = _raw_socket(socket.IPPROTO_UDP)
    try:
        sock.setblocking(False)
        _attach_filter(sock, program)
    except OSError as error:
        sock.close()
        raise WgpunchError(f"raw UDP: the kernel refused the filter: {error.strerror}") from None
    return sock


class _SockFilter(ctypes.Structure):
    _fields_ = (("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32))


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter)))


def _attach_filter(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    """SO_ATTACH_FILTER: the kernel checks the program and raises OSError if it is invalid."""
    instructions = (_SockFilter * len(program))(*(_SockFilter(*op) for op in program))
    fprog = _SockFprog(len(program), instructions)
    # bytes(fprog) holds a pointer into `instructions`, which this frame keeps alive; the
    # kernel copies the program during the call.
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, bytes(fprog))


def _reply_payload(packet: bytes, server_ip: ipaddress.IPv4Address, server_port: int,
                   local_port: int) -> bytes | None:
    """The UDP payload of `packet` (read from a raw IPv4 socket) if it is a whole datagram
    from `server_ip:server_port` to `local_port`, else None; never raises.

    The UDP checksum is not verified: a raw socket can see a datagram whose checksum the
    sender left to offload (veth, virtio: the field holds only the pseudo-header sum), and the
    kernel has validated nothing yet when it copies a packet to raw sockets.
    """
    if len(packet) < _IP_HEADER or packet[0] >> 4 != 4:
        return None
    header_length = (packet[0] & 0x0F) * 4
    total_length, fragment, protocol = struct.unpack_from("!H2xHxB", packet, 2)
    source = packet[12:16]
    if (header_length < _IP_HEADER or header_length + _UDP_HEADER > total_length
            or total_length > len(packet) or protocol != _IPPROTO_UDP
            or fragment & _FRAGMENT_BITS or source != server_ip.packed):
        return None
    sport, dport, udp_length = struct.unpack_from("!HHH", packet, header_length)
    # UDP may end before the IP payload does (the rest is padding, which the kernel trims
    # too); a UDP length past the end of the datagram means a broken or truncated one.
    if (sport, dport) != (server_port, local_port) or not (
            _UDP_HEADER <= udp_length <= total_length - header_length):
        return None
    return packet[header_length + _UDP_HEADER:header_length + udp_length]


def _raw_socket(protocol: int) -> socket.socket:
    try:
        return socket.socket(socket.AF_INET, socket.SOCK_RAW, protocol)
    except PermissionError:
        raise CapabilityError(
            "natpunch: opening a raw socket needs CAP_NET_RAW (run as root or grant it: "
            "setcap cap_net_raw+ep on the Python interpreter)"
        ) from None
    except OSError as error:
        raise WgpunchError(f"natpunch: cannot open a raw IPv4 socket: {error.strerror}") from None


class RawUdp:
    """UDP to one server from a local port that another socket (WireGuard) owns."""

    def __init__(self, local_port: int, server: Endpoint, *, ttl: int = 64) -> None:
        if not isinstance(server.ip, ipaddress.IPv4Address):
            raise WgpunchError(
                f"natpunch: server {server} is IPv6, but natpunch is IPv4 only: both "
                "rendezvous protocols listen on IPv4 and answer with a 4-byte address"
            )
        if not 1 <= local_port <= 65535:
            raise WgpunchError(f"natpunch: local port {local_port} is not in 1-65535")
        if not 1 <= ttl <= 255:
            raise WgpunchError(f"natpunch: TTL {ttl} is not in 1-255")
        self.local_port = local_port
        self.server = server
        self.ttl = ttl
        self._server_ip: ipaddress.IPv4Address = server.ip
        self._closed = False
        with contextlib.ExitStack() as opened:
            # IPPROTO_RAW: send-only, with IP_HDRINCL on: our IP header goes out as written,
            # but for the fields raw(7) says the kernel fills in (checksum, ID when zero).
            self._send = opened.enter_context(_raw_socket(socket.IPPROTO_RAW))
            self._recv = opened.enter_context(_raw_socket(socket.IPPROTO_UDP))
            self._recv.setblocking(False)
            try:
                _attach_filter(self._recv, reply_filter(self._server_ip, server.port, local_port))
            except OSError as error:
                raise WgpunchError(
                    f"natpunch: the kernel refused the reply filter: {error.strerror}"
                ) from None
            opened.pop_all()

    def send(self, payload: bytes) -> None:
        """One datagram from (route source address, local_port) to the server."""
        self._check_open()
        if _IP_HEADER + _UDP_HEADER + len(payload) > _MAX_IPV4:
            raise WgpunchError(f"natpunch: a {len(payload)}-byte payload does not fit in UDP")
        try:
            # Looked up per datagram, so a changed address or route is followed at once.
            source = source_address(self.server)
            self._send.sendto(
                udp_datagram(source, self.local_port, str(self._server_ip), self.server.port,
                             payload, self.ttl),
                (str(self._server_ip), 0),
            )
        except OSError as error:
            # EMSGSIZE included: with IP_HDRINCL the kernel does not fragment for us.
            raise WgpunchError(
                f"natpunch: sending {len(payload)} bytes to {self.server} from port "
                f"{self.local_port} failed: {error.strerror or error}"
            ) from None

    # The timeout is part of the call (ASYNC109 prefers the caller's asyncio.timeout) because
    # running out of time is an answer here, None, not an error.
    async def recv(self, timeout: float) -> bytes | None:  # noqa: ASYNC109
        """The UDP payload of the server's next datagram to our port; None after `timeout` s.

        One receive at a time: a second concurrent one would take over the socket's reader.
        """
        self._check_open()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(loop.time() + timeout):
                while True:
                    # No ICMP error surfaces here: the kernel reports those to a raw socket
                    # only when it is connected or has IP_RECVERR (raw_err), and ours has
                    # neither, so ICMP about WireGuard's own traffic cannot end a receive.
                    try:
                        packet = await loop.sock_recv(self._recv, _MAX_IPV4)
                    except OSError as error:
                        raise WgpunchError(
                            f"natpunch: receiving from {self.server} failed: "
                            f"{error.strerror or error}"
                        ) from None
                    payload = _reply_payload(packet, self._server_ip, self.server.port,
                                             self.local_port)
                    if payload is not None:
                        return payload
        except TimeoutError:
            return None

    def queued(self) -> list[bytes]:
        """The UDP payloads of the server's datagrams to our port that have arrived and not
        been read, without waiting (not while a `recv` runs)."""
        self._check_open()
        found: list[bytes] = []
        while True:
            try:
                packet = self._recv.recv(_MAX_IPV4)
            except BlockingIOError:
                return found
            except OSError as error:
                raise WgpunchError(f"natpunch: receiving from {self.server} failed: "
                                   f"{error.strerror or error}") from None
            payload = _reply_payload(packet, self._server_ip, self.server.port,
                                     self.local_port)
            if payload is not None:
                found.append(payload)

    def _check_open(self) -> None:
        if self._closed:
            raise WgpunchError(f"natpunch: the raw UDP channel to {self.server} is closed")

    def close(self) -> None:
        self._closed = True
        self._send.close()
        self._recv.close()

    def __enter__(self) -> RawUdp:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()
