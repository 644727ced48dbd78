"""Port mapping's pure parts: the NAT-PMP (RFC 6886) and PCP (RFC 6887) codecs against
vectors written out from the RFCs' layouts, strict parsing of broken answers, the default
gateway from /proc/net/route, who initiates when a mapping is the way in; and the exchange
(retransmission, skipped junk, a refusal) against a throwaway UDP server on loopback.
tests/test_portmap_lab.py runs the same client against the real miniupnpd."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from typing import Any

import pytest

from wgpunch.errors import MalformedPacket, PortMapError
from wgpunch.keys import Key
from wgpunch.node.portmap import natpmp, pcp
from wgpunch.node.portmap.gateway import parse_routes
from wgpunch.node.portmap.mapper import Mapping, PortmapTimings, keep_mapped, reachable
from wgpunch.node.portmap.rule import HOLD_BACK_ATTEMPTS, holds_back, initiates_by_mapping
from wgpunch.node.portmap.transport import ExchangeTimings, exchange
from wgpunch.protocol import PeerRecord, Reported
from wgpunch.wg.model import Endpoint

IP = ipaddress.IPv4Address
NONCE = bytes(range(1, 13))
PUBLIC = "c6336402"  # 198.51.100.2
MAPPED_V4 = "00000000000000000000ffff"

# -- NAT-PMP -------------------------------------------------------------------------------

MAP_REQUEST = bytes.fromhex("0001 0000 ca6c ca6c 00001c20")  # 51820 -> 51820, 7200 s
MAP_ANSWER = bytes.fromhex("0081 0000 0000003c ca6c 9c40 00001c20")  # -> 40000, epoch 60
ADDRESS_ANSWER = bytes.fromhex("0080 0000 0000003c" + PUBLIC)


def test_natpmp_requests_are_the_rfc_layout():
    assert natpmp.address_request() == bytes.fromhex("0000")
    assert natpmp.map_request(51820, 51820, 7200) == MAP_REQUEST
    assert natpmp.map_request(51820, 0, 0) == bytes.fromhex("0001 0000 ca6c 0000 00000000")


def test_natpmp_answers_parse():
    assert natpmp.parse_address(ADDRESS_ANSWER) == natpmp.ExternalAddress(60, IP("198.51.100.2"))
    assert natpmp.parse_map(MAP_ANSWER, 51820) == natpmp.MapReply(60, 51820, 40000, 7200)


@pytest.mark.parametrize(("intent", "data", "match"), [
    ("empty", b"", "0-byte datagram"),
    ("header cut", MAP_ANSWER[:3], "3-byte datagram"),
    ("answer cut", MAP_ANSWER[:-1], "15-byte answer, expected 16"),
    ("trailing bytes", MAP_ANSWER + b"\0", "17-byte answer"),
    ("version 2 (PCP)", b"\x02" + MAP_ANSWER[1:], "version 2"),
    ("a request, not an answer", MAP_REQUEST + bytes(4), "opcode 1, expected 129"),
    ("the TCP answer", b"\x00\x82" + MAP_ANSWER[2:], "opcode 130"),
    ("another internal port", MAP_ANSWER[:8] + b"\x00\x50" + MAP_ANSWER[10:],
     "internal port 80"),
])
def test_natpmp_broken_answers(intent, data, match):
    with pytest.raises(MalformedPacket, match=match):
        natpmp.parse_map(data, 51820)


@pytest.mark.parametrize(("code", "name"), [(2, "not authorized"), (3, "network failure"),
                                            (4, "out of resources"), (99, "unknown result 99")])
def test_natpmp_refusals_name_the_result(code, name):
    refusal = MAP_ANSWER[:2] + code.to_bytes(2, "big") + MAP_ANSWER[4:8]  # 8 bytes suffice
    with pytest.raises(PortMapError, match=f"gateway answered {name}") as caught:
        natpmp.parse_map(refusal, 51820)
    assert caught.value.code == code


# -- PCP -----------------------------------------------------------------------------------

PCP_REQUEST = bytes.fromhex(
    "02 01 0000 00001c20" + MAPPED_V4 + "c0a8010a"  # lifetime 7200, client 192.168.1.10
    + NONCE.hex() + "11 000000 ca6c ca6c" + MAPPED_V4 + "00000000")
PCP_ANSWER = bytes.fromhex(
    "02 81 00 00 00001c20 0000003c" + "00" * 12
    + NONCE.hex() + "11 000000 ca6c 9c40" + MAPPED_V4 + PUBLIC)


def test_pcp_request_is_the_rfc_layout():
    assert pcp.map_request(IP("192.168.1.10"), NONCE, 51820, 51820, 7200) == PCP_REQUEST
    with pytest.raises(ValueError, match="nonce is 12 bytes"):
        pcp.map_request(IP("192.168.1.10"), b"short", 51820, 51820, 7200)


def test_pcp_answer_parses_with_or_without_options():
    want = pcp.MapReply(7200, 60, 40000, IP("198.51.100.2"))
    assert pcp.parse_map(PCP_ANSWER, NONCE, 51820) == want
    third_party = bytes.fromhex("01 00 0010") + bytes(16)  # an option of 16 bytes
    assert pcp.parse_map(PCP_ANSWER + third_party, NONCE, 51820) == want


def _pcp(at: int, value: bytes, data: bytes = PCP_ANSWER) -> bytes:
    return data[:at] + value + data[at + len(value):]


@pytest.mark.parametrize(("intent", "data", "match"), [
    ("empty", b"", "0-byte datagram"),
    ("version 1", _pcp(0, b"\x01"), "version 1"),
    ("a request", _pcp(1, b"\x01"), "expected a MAP response"),
    ("an ANNOUNCE answer", _pcp(1, b"\x80"), "expected a MAP response"),
    ("cut", PCP_ANSWER[:-4], "56-byte MAP answer"),
    ("not a multiple of 4", PCP_ANSWER + b"\0", "61-byte"),
    ("too long", PCP_ANSWER + bytes(1100), "at most 1100"),
    ("another nonce", _pcp(24, b"\xff"), "nonce differs"),
    ("TCP", _pcp(36, b"\x06"), "protocol 6 port 51820"),
    ("another internal port", _pcp(40, b"\x00\x50"), "protocol 17 port 80"),
    ("option header cut", PCP_ANSWER + bytes.fromhex("0100"), "62-byte"),
    ("option longer than the datagram", PCP_ANSWER + bytes.fromhex("01 00 0010") + bytes(4),
     "runs past"),
    ("external port 0 with a lifetime", _pcp(42, b"\0\0"), "external port 0"),
])
def test_pcp_broken_answers(intent, data, match):
    with pytest.raises(MalformedPacket, match=match):
        pcp.parse_map(data, NONCE, 51820)


def test_pcp_refusals_and_a_natpmp_only_gateway():
    with pytest.raises(PortMapError, match="NOT_AUTHORIZED") as caught:
        pcp.parse_map(_pcp(3, b"\x02"), NONCE, 51820)
    assert caught.value.code == pcp.Result.NOT_AUTHORIZED
    # RFC 6887 §9: a NAT-PMP server answers version 2 with its "unsupported version".
    with pytest.raises(PortMapError, match="NAT-PMP only") as caught:
        pcp.parse_map(bytes.fromhex("0081 0001 0000003c"), NONCE, 51820)
    assert caught.value.code == pcp.Result.UNSUPP_VERSION


def test_a_pcp_deletion_answer_may_have_port_0():
    gone = _pcp(4, bytes(4), _pcp(42, b"\0\0"))
    assert pcp.parse_map(gone, NONCE, 51820).lifetime_s == 0


# -- the default gateway -------------------------------------------------------------------

ROUTES_HEADER = ("Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\t"
                 "Window\tIRTT\n")


def route(iface: str, dest: str, gateway: str, flags: str, metric: int, mask: str) -> str:
    return f"{iface}\t{dest}\t{gateway}\t{flags}\t0\t0\t{metric}\t{mask}\t0\t0\t0\n"


@pytest.mark.parametrize(("intent", "lines", "want"), [
    ("one default route", [route("eth0", "00000000", "0101A8C0", "0003", 0, "00000000"),
                           route("eth0", "0001A8C0", "00000000", "0001", 0, "00FFFFFF")],
     "192.168.1.1"),
    ("the lowest metric wins", [route("wlan0", "00000000", "0102A8C0", "0003", 600, "00000000"),
                                route("eth0", "00000000", "0101A8C0", "0003", 100, "00000000")],
     "192.168.1.1"),
    ("no default route", [route("eth0", "0001A8C0", "00000000", "0001", 0, "00FFFFFF")], None),
    ("a default route without a gateway (point-to-point)",
     [route("wg0", "00000000", "00000000", "0001", 0, "00000000")], None),
    ("a route that is down", [route("eth0", "00000000", "0101A8C0", "0002", 0, "00000000")],
     None),
    ("junk lines are skipped", ["garbage\n", route("eth0", "zz", "0101A8C0", "0003", 0, "0"),
                                route("eth0", "00000000", "0101A8C0", "0003", 0, "00000000")],
     "192.168.1.1"),
])
def test_default_gateway_from_the_routing_table(intent, lines, want):
    got = parse_routes(ROUTES_HEADER + "".join(lines))
    assert got == (None if want is None else IP(want))


# -- who initiates -------------------------------------------------------------------------

def record(mapped: str | None) -> PeerRecord:
    reported = Reported(51820, (), "0.1.0",
                        None if mapped is None else Endpoint.parse(mapped))
    return PeerRecord(Key(bytes([7]) * 32), (), Endpoint.parse("198.51.100.6:51820"), None,
                      reported, 1)


@pytest.mark.parametrize(("intent", "we_mapped", "peer_mapped", "initiates", "hold"), [
    ("the peer has a mapping, we have none: we send to it", False, True, True, False),
    ("we have one, the peer none: it sends to ours, we send nothing first", True, False,
     False, True),
    ("both have one: the protocol's rule decides", True, True, None, False),
    ("neither has one: the protocol's rule decides", False, False, None, False),
])
def test_initiator_by_mapping(intent, we_mapped, peer_mapped, initiates, hold):
    peer = record("198.51.100.2:51820" if peer_mapped else None)
    assert initiates_by_mapping(we_mapped, peer) is initiates
    assert holds_back(we_mapped, peer, 0) is hold
    # A mapping may lead nowhere: after HOLD_BACK_ATTEMPTS rounds, punching as without one.
    assert holds_back(we_mapped, peer, HOLD_BACK_ATTEMPTS) is False


def test_a_peer_that_never_reported_has_no_mapping():
    peer = PeerRecord(Key(bytes([7]) * 32), (), None, None, None, 1)
    assert initiates_by_mapping(True, peer) is False


# -- one exchange, against a throwaway server on loopback -----------------------------------

FAST = ExchangeTimings(first_wait_s=0.05, tries=3)
LOOPBACK = IP("127.0.0.1")


class Gateway(asyncio.DatagramProtocol):
    """Answers the n-th request with `answers[n]` (None: stays silent)."""

    def __init__(self, answers: list[bytes | None]) -> None:
        self.answers = answers
        self.requests: list[bytes] = []
        self.transport: Any = None  # asyncio's datagram transport (not a DatagramTransport)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.requests.append(data)
        answer = self.answers[min(len(self.requests), len(self.answers)) - 1]
        if answer is not None and self.transport is not None:
            self.transport.sendto(answer, addr)


async def served(answers: list[bytes | None]) -> tuple[Gateway, int, Any]:
    loop = asyncio.get_running_loop()
    transport, gateway = await loop.create_datagram_endpoint(
        lambda: Gateway(answers), local_addr=("127.0.0.1", 0))
    return gateway, transport.get_extra_info("sockname")[1], transport


async def ask(port: int) -> natpmp.MapReply:
    return await exchange(LOOPBACK, lambda ours: natpmp.map_request(51820, 51820, 7200),
                          lambda data: natpmp.parse_map(data, 51820), FAST, what="NAT-PMP",
                          port=port)


async def test_a_lost_request_is_sent_again_and_junk_is_skipped():
    gateway, port, transport = await served([None, b"junk", MAP_ANSWER])
    try:
        # The second request's answer is junk, which is skipped; the third try is answered.
        assert (await ask(port)).external_port == 40000
        assert gateway.requests == [MAP_REQUEST] * 3
    finally:
        transport.close()


async def test_silence_and_refusals_end_the_exchange():
    gateway, port, transport = await served([None])
    try:
        with pytest.raises(PortMapError, match=f"no answer from 127.0.0.1:{port}"):
            await ask(port)
        assert len(gateway.requests) == FAST.tries
        gateway.answers = [MAP_ANSWER[:2] + b"\x00\x02" + MAP_ANSWER[4:8]]
        with pytest.raises(PortMapError, match="not authorized"):
            await ask(port)
    finally:
        transport.close()
    # Nothing listens there any more: ICMP port unreachable ends it at the first try.
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(PortMapError, match="refuses: Connection refused"):
        await ask(port)
    assert loop.time() - started < FAST.first_wait_s


@pytest.mark.parametrize(("external", "usable"), [
    ("198.51.100.2:51820", True),  # the lab's "public" addresses (documentation ranges)
    ("203.0.113.9:1", True),
    ("8.8.8.8:51820", True),
    ("100.64.1.2:51820", False),  # a home router behind a carrier NAT (RFC 6598)
    ("192.168.0.2:51820", False),  # a router behind another router
    ("10.1.2.3:51820", False),
    ("172.20.0.1:51820", False),
    ("169.254.1.1:51820", False),
    ("0.0.0.0:51820", False),
])
def test_a_mapping_behind_another_nat_is_not_worth_reporting(external, usable):
    assert reachable(Endpoint.parse(external)) is usable


# -- keeping a mapping: renewal, a failed renewal, a new gateway, deletion ------------------

GW_A, GW_B = IP("192.168.1.1"), IP("192.168.7.1")
QUICK = PortmapTimings(lifetime_s=2, min_renew_s=0.1, gateway_check_s=0.05, retry_first_s=0.2,
                       retry_max_s=0.2)


class FakeGateways:
    """map_once and unmap for keep_mapped, answering from a script: each call takes the next
    outcome (an external port, or None: the gateway does not answer). `progress` is set at
    each call and each change keep_mapped reports (`changed`)."""

    def __init__(self, outcomes: list[int | None]) -> None:
        self.outcomes = outcomes
        self.calls: list[tuple[IP, Mapping | None]] = []
        self.changes: list[Mapping | None] = []
        self.deleted: list[Mapping] = []
        self.gateway = GW_A
        self.progress = asyncio.Event()

    def changed(self, mapping: Mapping | None) -> None:
        self.changes.append(mapping)
        self.progress.set()

    async def map(self, gateway: IP, port: int, t: PortmapTimings, *,
                  previous: Mapping | None = None) -> Mapping:
        self.calls.append((gateway, previous))
        self.progress.set()
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if outcome is None:
            raise PortMapError("PCP: no answer")
        return Mapping("pcp", gateway, port, Endpoint(IP("198.51.100.2"), outcome), 2, NONCE)

    async def unmap(self, mapping: Mapping, t: PortmapTimings) -> None:
        self.deleted.append(mapping)


async def keeping(fake: FakeGateways, until: Any) -> list[Mapping | None]:
    """Run keep_mapped against `fake` until `until()` holds (checked at each step of it,
    within 10 s); returns the changes it reported."""
    task = asyncio.create_task(keep_mapped(51820, fake.changed, QUICK, lambda: fake.gateway,
                                           mapper=fake.map, unmapper=fake.unmap))
    try:
        async with asyncio.timeout(10):
            while not until():
                await fake.progress.wait()
                fake.progress.clear()
    except TimeoutError:
        raise AssertionError(f"no end after 10 s: {fake.changes}, {fake.calls}") from None
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return fake.changes


async def test_renewed_at_half_the_lifetime_and_one_lost_renewal_keeps_it():
    fake = FakeGateways([40000, None, 40000, 40000])
    changes = await keeping(fake, lambda: len(fake.calls) >= 4)
    assert [c.external.port if c else None for c in changes] == [40000]  # never withdrawn
    assert [previous is not None for _, previous in fake.calls] == [False, True, True, True]
    assert fake.deleted == changes  # deleted on the way out


async def test_a_lease_that_runs_out_unrenewed_is_withdrawn_then_mapped_again():
    # Retries at half of what is left (1, 1.5, 1.75, 1.875, 1.975 s into a 2 s lease: never
    # more), then, run out, the mapping is withdrawn, and asked for every retry_first_s.
    fake = FakeGateways([40000, *[None] * 7, 40001])
    changes = await keeping(fake, lambda: len(fake.changes) >= 3)
    assert [c.external.port if c else None for c in changes] == [40000, None, 40001]


async def test_a_new_gateway_is_asked_at_once():
    fake = FakeGateways([40000, 40002])

    def moved() -> bool:
        if fake.changes and fake.gateway == GW_A:
            fake.gateway = GW_B  # roamed to another network, long before the renewal
        return len(fake.changes) >= 2

    changes = await keeping(fake, moved)
    assert [(c.gateway, c.external.port) for c in changes if c] == [(GW_A, 40000),
                                                                     (GW_B, 40002)]
    assert fake.calls[1] == (GW_B, None)  # a fresh mapping there, not a renewal
