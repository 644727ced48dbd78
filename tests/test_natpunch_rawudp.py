"""The raw UDP channel of natpunch: its reply filter, run by a small classic-BPF interpreter and
by the kernel, its user-space re-check, and a real exchange from a port another socket owns."""

import asyncio
import ctypes
import errno
import ipaddress
import os
import random
import secrets
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from wgpunch.errors import WgpunchError
from wgpunch.lab.netns import NETNS_DIR, Namespace, read_line
from wgpunch.natpunch.rawudp import (
    RawUdp,
    _attach_filter,
    _reply_payload,
    reply_filter,
    udp_datagram,
)
from wgpunch.wg.model import Endpoint

SERVER = "198.51.100.7"
LOCAL = "192.168.1.10"
SPORT = 49918  # the server's port
LPORT = 51820  # ours, owned by WireGuard
PROGRAM = reply_filter(ipaddress.IPv4Address(SERVER), SPORT, LPORT)

# Classic BPF opcodes, from <linux/filter.h> (written out here, not imported, so that the
# interpreter checks the module's encoding rather than sharing it).
LD, LDX, ALU, JMP, RET = 0x00, 0x01, 0x04, 0x05, 0x06
W, H, B = 0x00, 0x08, 0x10
ABS, IND, MSH = 0x20, 0x40, 0xA0
AND, JEQ, JSET, K = 0x50, 0x10, 0x40, 0x00
LOAD_SIZES = {LD | W | ABS: 4, LD | H | ABS: 2, LD | B | ABS: 1, LD | H | IND: 2,
              LD | W | IND: 4}


def run_bpf(program: list[tuple[int, int, int, int]], packet: bytes) -> int:
    """What the kernel's classic BPF would return for `packet`: bytes to keep, 0 to drop."""
    a = x = pc = 0
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        if code in LOAD_SIZES:
            offset = k + (x if code & IND else 0)
            size = LOAD_SIZES[code]
            if offset + size > len(packet):
                return 0  # the kernel drops a packet a load runs past
            a = int.from_bytes(packet[offset:offset + size], "big")
        elif code == LDX | B | MSH:
            if k >= len(packet):
                return 0
            x = 4 * (packet[k] & 0x0F)
        elif code == ALU | AND | K:
            a &= k
        elif code == JMP | JEQ | K:
            pc += jt if a == k else jf
        elif code == JMP | JSET | K:
            pc += jt if a & k else jf
        elif code == RET | K:
            return k
        else:
            raise AssertionError(f"opcode {code:#04x} is not one the interpreter knows")


def packet(*, src: str = SERVER, sport: int = SPORT, dport: int = LPORT, protocol: int = 17,
           fragment: int = 0x4000, options: bytes = b"", payload: bytes = b"reply",
           udp_length: int | None = None, version: int = 4) -> bytes:
    """An IPv4 packet as a raw socket reads it; checksums left zero (nothing here checks)."""
    length = 8 + len(payload) if udp_length is None else udp_length
    udp = struct.pack("!HHHH", sport, dport, length, 0) + payload
    ihl = 5 + len(options) // 4
    header = struct.pack("!BBHHHBBH4s4s", version << 4 | ihl, 0, ihl * 4 + len(udp), 0,
                         fragment, 64, protocol, 0, socket.inet_aton(src),
                         socket.inet_aton(LOCAL))
    return header + options + udp


ROUTER_ALERT = bytes.fromhex("94040000")  # RFC 2113: a real option, 4 bytes, IHL 6
CASES = {
    "reply as udp_datagram builds it": (
        udp_datagram(SERVER, SPORT, LOCAL, LPORT, b"reply", 64), True),
    "reply without DF": (packet(fragment=0), True),
    "reply with IP options, IHL 6": (packet(options=ROUTER_ALERT), True),
    "reply with 40 bytes of IP options, IHL 15": (packet(options=b"\x01" * 39 + b"\0"), True),
    "wrong source address": (packet(src="198.51.100.8"), False),
    "wrong source port": (packet(sport=SPORT + 1), False),
    "wrong destination port": (packet(dport=LPORT + 1), False),
    "TCP": (packet(protocol=6), False),
    "last fragment (offset != 0)": (packet(fragment=185), False),
    "middle fragment": (packet(fragment=0x2000 | 185), False),
    # A first fragment has the UDP header but not the whole payload; the kernel reassembles
    # before raw delivery, so a real reply never looks like this (see reply_filter).
    "first fragment (MF, offset 0)": (packet(fragment=0x2000), False),
    # The options hold our ports where a filter assuming 20 bytes of header would look.
    "options that look like the right ports, wrong real ports": (
        packet(options=struct.pack("!HH", SPORT, LPORT), sport=1, dport=2), False),
    "not IPv4": (packet(version=6), False),
    "cut off before the destination port": (packet()[:22], False),
}


@pytest.mark.parametrize(("data", "accepted"), CASES.values(), ids=CASES.keys())
def test_the_filter_and_the_user_space_check_agree(data: bytes, accepted: bool) -> None:
    kept = run_bpf(PROGRAM, data)
    assert (kept > 0) == accepted
    if accepted:
        assert kept >= len(data)  # the whole packet, not a truncated copy
        assert _reply_payload(data, ipaddress.IPv4Address(SERVER), SPORT, LPORT) == b"reply"
    else:
        assert _reply_payload(data, ipaddress.IPv4Address(SERVER), SPORT, LPORT) is None


def test_the_filter_reads_the_ports_after_the_options() -> None:
    """IHL decides where UDP starts: with options, the fixed offsets 20/22 of the reference
    filters would read option bytes; ours reads the ports at 4 * IHL."""
    assert run_bpf(PROGRAM, packet(options=ROUTER_ALERT, sport=SPORT + 1)) == 0
    assert run_bpf(PROGRAM, packet(options=ROUTER_ALERT, dport=LPORT + 1)) == 0
    assert run_bpf(PROGRAM, packet(options=ROUTER_ALERT)) == 0xFFFF


def payload_of(data: bytes) -> bytes | None:
    return _reply_payload(data, ipaddress.IPv4Address(SERVER), SPORT, LPORT)


def test_user_space_checks_the_lengths() -> None:
    assert payload_of(packet(udp_length=8 + 6)) is None  # UDP claims more than is there
    assert payload_of(packet(udp_length=7)) is None  # shorter than its own header
    assert payload_of(packet(udp_length=8 + 2)) == b"re"  # the rest is IP padding
    assert payload_of(packet(payload=b"")) == b""  # natpunch's "not found" reply
    assert payload_of(packet() + b"\0" * 6) == b"reply"  # bytes past the IP total length
    assert payload_of(packet()[:-1]) is None  # total length past the end of what was read
    short_ihl = bytes([0x44]) + packet()[1:]  # IHL 4: a header shorter than 20 bytes
    assert payload_of(short_ihl) is None
    assert payload_of(b"") is None
    assert payload_of(packet()[:19]) is None


def test_user_space_check_never_raises() -> None:
    rng = random.Random(7)
    good = packet(options=ROUTER_ALERT)
    for _ in range(5000):
        mutated = bytearray(good[:rng.randrange(len(good) + 1)])
        for _ in range(rng.randrange(4)):
            if mutated:
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        payload_of(bytes(mutated))
        payload_of(rng.randbytes(rng.randrange(64)))


def test_the_kernel_accepts_the_program() -> None:
    # Attaching needs no privilege and the kernel checks a program the same way for every
    # socket type, so a plain UDP socket is enough to prove the encoding valid.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        _attach_filter(sock, PROGRAM)
        # ...and that attaching really is checked: a jump past the end is refused.
        with pytest.raises(OSError) as refused:
            _attach_filter(sock, [(JMP | JEQ | K, 5, 0, 1), (RET | K, 0, 0, 0)])
        assert refused.value.errno == errno.EINVAL


def test_ipv6_server_is_refused_with_the_reason() -> None:
    with pytest.raises(WgpunchError, match="IPv4 only"):
        RawUdp(LPORT, Endpoint(ipaddress.ip_address("2001:db8::1"), SPORT))


NO_CAP = """
import ipaddress
from wgpunch.errors import WgpunchError
from wgpunch.natpunch.rawudp import RawUdp
from wgpunch.wg.model import Endpoint
try:
    RawUdp(51820, Endpoint(ipaddress.ip_address("192.0.2.2"), 49918))
except WgpunchError as error:
    print(type(error).__name__, error)
"""


def test_without_cap_net_raw_the_error_names_it() -> None:
    src = str(Path(__file__).resolve().parents[1] / "src")
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("dropping CAP_NET_RAW as root needs setpriv")
        # Still root (so the interpreter stays readable), minus CAP_NET_RAW for good: out of
        # the bounding set, which caps what exec grants root, and out of the inheritable set.
        prefix = ["setpriv", "--bounding-set=-net_raw", "--inh-caps=-net_raw"]
    else:
        prefix = []  # an ordinary user has no CAP_NET_RAW to begin with
    done = subprocess.run([*prefix, sys.executable, "-c", NO_CAP], capture_output=True,
                          text=True, timeout=30, env={**os.environ, "PYTHONPATH": src},
                          check=False)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith("CapabilityError natpunch: ")
    assert "CAP_NET_RAW" in done.stdout


# ------------------------------------------------------------------------------------------
# A real exchange between two throwaway network namespaces joined by a veth link.

A_IP, B_IP, B_OTHER_IP = "192.0.2.1", "192.0.2.2", "192.0.2.3"
BIG = bytes(range(256)) * 12  # 3072 bytes: fragmented on a 1500-byte link

ECHO = f"""
import socket
def bound(address):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(address)
    return sock
main = bound(("{B_IP}", {SPORT}))
other_port = bound(("{B_IP}", {SPORT + 1}))
other_address = bound(("{B_OTHER_IP}", {SPORT}))
print("ready", flush=True)
while True:
    data, peer = main.recvfrom(65535)
    print("from", peer[0], peer[1], data[:16].decode(errors="replace"), flush=True)
    if data == b"spray":
        other_port.sendto(b"wrong source port", peer)
        other_address.sendto(b"wrong source address", peer)
        main.sendto(b"after spray", peer)
    elif data == b"big":
        main.sendto({BIG!r}, peer)
    else:
        main.sendto(data, peer)
"""

T = TypeVar("T")
CLONE_NEWNET = 0x40000000


def in_netns(ns: Namespace, function: Callable[[], T]) -> T:
    """`function()` run in a thread that has entered `ns`; sockets it makes live there.

    A network namespace belongs to the thread, and the pool's only thread ends with the pool,
    so the rest of the test process never leaves the root namespace.
    """
    libc = ctypes.CDLL(None, use_errno=True)

    def entered() -> T:
        fd = os.open(NETNS_DIR / ns.name, os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {ns.name}")
        finally:
            os.close(fd)
        return function()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(entered).result(timeout=60)


@dataclass
class Pair:
    a: Namespace
    b: Namespace
    echo: subprocess.Popen[str]


@contextmanager
def namespace_pair() -> Iterator[Pair]:
    """A (192.0.2.1) and B (192.0.2.2 and .3) on a veth link, an echo server running in B."""
    while True:
        prefix = "ru" + secrets.token_hex(2)
        a, b = Namespace(f"{prefix}-a"), Namespace(f"{prefix}-b")
        if not (a.exists() or b.exists()):
            break
    echo: subprocess.Popen[str] | None = None
    try:
        a.add()
        b.add()
        a.run(["ip", "link", "add", f"{prefix}va", "type", "veth", "peer", "name",
               f"{prefix}vb", "netns", b.name])
        a.ip_batch([f"addr add {A_IP}/24 dev {prefix}va", f"link set {prefix}va up"])
        b.ip_batch([f"addr add {B_IP}/24 dev {prefix}vb", f"addr add {B_OTHER_IP}/24 dev "
                    f"{prefix}vb", f"link set {prefix}vb up"])
        echo = b.popen([sys.executable, "-c", ECHO], stdout=subprocess.PIPE, text=True)
        assert read_line(echo, timeout=10, what="echo server") == "ready"
        yield Pair(a, b, echo)
    finally:
        if echo is not None:
            echo.kill()
            echo.wait()
            assert echo.stdout is not None
            echo.stdout.close()
        a.delete()  # takes the veth pair with it
        b.delete()


def exchange() -> None:
    """Run inside A: WireGuard's stand-in owns LPORT, RawUdp talks to B from it."""

    async def talk(wireguard: socket.socket, channel: RawUdp) -> None:
        def wireguard_got() -> tuple[bytes, tuple[str, int]]:
            data, (host, port) = wireguard.recvfrom(65535)
            return data, (host, port)

        channel.send(b"hello")
        assert await channel.recv(5) == b"hello"
        assert wireguard_got() == (b"hello", (B_IP, SPORT))  # WireGuard got its copy

        # Two datagrams to our port that are not the server's, then one that is: recv
        # returns the third, so it passed the first two over.
        channel.send(b"spray")
        assert await channel.recv(5) == b"after spray"
        assert [wireguard_got() for _ in range(3)] == [
            (b"wrong source port", (B_IP, SPORT + 1)),
            (b"wrong source address", (B_OTHER_IP, SPORT)),
            (b"after spray", (B_IP, SPORT)),
        ]

        # Again, now proving the kernel filter dropped them: once WireGuard's socket holds
        # all three, the raw socket had its copies first (raw delivery precedes UDP's), and
        # only the server's reply is queued there.
        channel.send(b"spray")
        assert [wireguard_got()[0] for _ in range(3)] == [
            b"wrong source port", b"wrong source address", b"after spray"]
        assert channel.queued() == [b"after spray"]
        assert channel.queued() == []

        # A reply larger than the link MTU arrives in fragments; the kernel reassembles them
        # before the filter sees anything.
        channel.send(b"big")
        assert await channel.recv(5) == BIG

        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await channel.recv(0.3) is None
        assert 0.3 <= loop.time() - started < 2

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as wireguard:
        wireguard.bind(("0.0.0.0", LPORT))
        wireguard.settimeout(5)  # a deadline for each datagram, not a wait for one
        with RawUdp(LPORT, Endpoint(ipaddress.ip_address(B_IP), SPORT)) as channel:
            asyncio.run(talk(wireguard, channel))


@pytest.mark.lab
def test_a_real_exchange_from_a_port_another_socket_owns() -> None:
    with namespace_pair() as pair:
        in_netns(pair.a, exchange)
        # The server printed each request before answering it, and every answer came back,
        # so its output is complete: it saw every request come from A's WireGuard port.
        pair.echo.kill()
        pair.echo.wait()
        assert pair.echo.stdout is not None
        assert pair.echo.stdout.read().splitlines() == [
            f"from {A_IP} {LPORT} {word}" for word in ("hello", "spray", "spray", "big")]
