"""Raw NAT openers: the datagram's layout and checksums, and a real kernel accepting it."""

import asyncio
import ipaddress
import shutil
import socket
import struct
import subprocess
import sys

import pytest

from wgpair import PORT, wg_pair
from wgpunch.natpunch.rawudp import checksum, udp_datagram
from wgpunch.node.punch import DEFAULT_TTL, UNMEASURED_TTL, OpenerTtl
from wgpunch.wg.model import Endpoint


def test_rfc1071_example():
    # RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to 0xddf2; the checksum is its complement.
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == ~0xDDF2 & 0xFFFF


def test_datagram_layout():
    packet = udp_datagram("192.168.1.10", 51820, "198.51.100.6", 40000, b"", 64)
    version_ihl, _tos, total, _id, frag, ttl, proto, _sum, src, dst = struct.unpack(
        "!BBHHHBBH4s4s", packet[:20])
    assert (version_ihl, total, frag, ttl, proto) == (0x45, 28, 0x4000, 64, 17)
    assert (socket.inet_ntoa(src), socket.inet_ntoa(dst)) == ("192.168.1.10", "198.51.100.6")
    assert checksum(packet[:20]) == 0  # a correct header sums to zero
    sport, dport, length, _ = struct.unpack("!HHHH", packet[20:28])
    assert (sport, dport, length) == (51820, 40000, 8)
    pseudo = packet[12:20] + struct.pack("!BBH", 0, 17, 8)
    assert checksum(pseudo + packet[20:]) == 0  # so does a correct UDP checksum


RECEIVE = """
import socket, sys
family, address = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET, sys.argv[1]
s = socket.socket(family, socket.SOCK_DGRAM)
s.bind((address, 40000))
print("ready", flush=True)
s.settimeout(5)
data, addr = s.recvfrom(100)
print(len(data), addr[0], addr[1], flush=True)
"""
SEND = """
import ipaddress, sys
from wgpunch.node.punch import send_opener
from wgpunch.wg.model import Endpoint
print(send_opener(51820, Endpoint(ipaddress.ip_address(sys.argv[1]), 40000)))
"""
# IPv6 on the pair's link, only inside its namespaces (documentation prefix, RFC 3849).
A6, B6 = "2001:db8:77::1", "2001:db8:77::2"


@pytest.mark.lab
@pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="wireguard-go not installed")
@pytest.mark.parametrize("family", [4, 6])
def test_the_kernel_delivers_an_opener_from_the_wireguard_port(tmp_path, family):
    """Sent from A's namespace while wireguard-go holds port 51820 there; B's kernel checks
    the checksums (over IPv6: the one the kernel filled in for our hand-made UDP header)
    before its socket sees the datagram, with A's WireGuard port as source."""
    with wg_pair(tmp_path) as (a, b):
        if family == 6:
            for side, name, address in ((a, "a", A6), (b, "b", B6)):
                veth = side.ifname.removesuffix(f"{name}wg") + f"v{name}"  # wgpair's naming
                side.ns.run(["ip", "addr", "add", f"{address}/64", "dev", veth, "nodad"])
        source, target = (a.veth_ip, b.veth_ip) if family == 4 else (A6, B6)
        receiver = b.ns.popen([sys.executable, "-c", RECEIVE, target], stdout=subprocess.PIPE,
                              text=True)
        try:
            assert receiver.stdout.readline().strip() == "ready"
            sent = a.ns.run([sys.executable, "-c", SEND, target]).stdout.strip()
            assert sent == "True"
            assert receiver.stdout.readline().split() == ["0", source, str(PORT)]
        finally:
            receiver.kill()
            receiver.wait()


async def test_openers_over_ipv6_go_as_far_as_they_need():
    """No NAT over IPv6, so no measured distance: the IPv4 one says nothing about that path."""
    ttl = OpenerTtl(fixed=2)
    assert await ttl.get(Endpoint.parse("[2001:db8::2]:51820")) == DEFAULT_TTL
    assert await ttl.get(Endpoint.parse("192.0.2.2:51820")) == 2


def test_inside_addresses_are_where_nats_number_their_inside():
    from ipaddress import ip_address

    from wgpunch.node.punch import inside_address
    for address in ("192.168.1.1", "10.0.0.1", "172.16.5.1", "100.64.1.1", "169.254.0.1"):
        assert inside_address(ip_address(address)), address
    # The lab's "public" addresses are documentation ranges: outside, as real public ones.
    for address in ("198.51.100.1", "203.0.113.5", "192.0.2.2", "8.8.8.8", "100.128.0.1"):
        assert not inside_address(ip_address(address)), address


async def test_an_opener_sent_while_the_ttl_is_measured_stops_after_one_nat():
    done = asyncio.Event()

    async def slow_hops(toward):
        await done.wait()
        return 3

    ttl = OpenerTtl(hops=slow_hops)
    assert await ttl.get() == DEFAULT_TTL  # nothing to measure toward
    ttl.measure(ipaddress.IPv4Address("192.0.2.2"))
    assert await ttl.get() == UNMEASURED_TTL  # still measuring: no further than one NAT
    done.set()
    assert await ttl.get() == 3
    assert await OpenerTtl(fixed=7).get() == 7

    async def nobody(toward):
        return None

    silent = OpenerTtl(hops=nobody)
    silent.measure(ipaddress.IPv4Address("192.0.2.2"))
    assert await silent.get() == DEFAULT_TTL  # nothing answered: reach everything
