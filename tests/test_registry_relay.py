"""The relay core: WireGuard shapes, slot rules (a table), and real sockets on loopback."""

import asyncio
import socket
import time

import pytest

from wgpunch.errors import RequestRefused
from wgpunch.keys import generate_keypair
from wgpunch.registry.relay import Relay
from wgpunch.registry.relayshape import MessageType, message_type
from wgpunch.registry.relayslots import RelayLimits, RelayTimings, SlotTable, Verdict

A, B, C = sorted((generate_keypair()[1] for _ in range(3)), key=lambda k: k.raw)


def wg(kind: int, length: int) -> bytes:
    return bytes([kind, 0, 0, 0]) + bytes(length - 4)


INIT, DATA = wg(1, 148), wg(4, 96)


@pytest.mark.parametrize(("data", "expected", "intent"), [
    (wg(1, 148), MessageType.INITIATION, "initiation, exact length"),
    (wg(2, 92), MessageType.RESPONSE, "response, exact length"),
    (wg(3, 64), MessageType.COOKIE, "cookie reply, exact length"),
    (wg(4, 32), MessageType.TRANSPORT, "keepalive: header and tag only"),
    (wg(4, 1456), MessageType.TRANSPORT, "data, padded to 16"),
    (wg(1, 149), None, "initiation one byte long"),
    (wg(2, 148), None, "response with an initiation's length"),
    (wg(4, 40), None, "data not a multiple of 16"),
    (wg(4, 16), None, "data shorter than a keepalive"),
    (wg(5, 64), None, "unknown type"),
    (bytes([1, 0, 0, 1]) + bytes(144), None, "reserved bytes not zero"),
    (b"GET / HTTP/1.1\r\n" * 4, None, "text"),
    (b"", None, "empty"),
])
def test_message_shapes(data, expected, intent):
    assert message_type(data) is expected, intent


def test_slot_rules_bind_forward_and_refuse_strangers():
    t = RelayTimings()
    table = SlotTable(range(40000, 40010))
    slot, made = table.allocate(B, A, now=0.0)
    assert made and slot.pair == (A, B) and table.allocate(A, B, 1.0) == (slot, False)
    pa, pb = slot.side_of(A).port, slot.side_of(B).port
    a, b = ("198.51.100.2", 51820), ("203.0.113.9", 40123)
    limits = table.limits

    def send(port, source, data, now, observed):
        return slot.receive(port, source, data, now, observed, limits, t)

    rows = [  # (port, source, data, now, observed IP, verdict, destination, intent)
        (pa, a, b"x" * 148, 1.0, a[0], Verdict.NOT_WIREGUARD, None, "not WireGuard: no bind"),
        (pa, ("192.0.2.7", 1), INIT, 1.0, a[0], Verdict.WRONG_SOURCE, None, "a third IP"),
        (pa, a, INIT, 1.0, None, Verdict.WRONG_SOURCE, None, "the node has no endpoint"),
        (pa, a, INIT, 1.0, a[0], Verdict.BOUND, None, "A bound; B not yet: dropped"),
        (pa, a, DATA, 1.1, a[0], Verdict.PEER_UNBOUND, None, "still no B"),
        (pb, b, INIT, 1.2, b[0], Verdict.BOUND, a, "B bound: delivered to A"),
        (pa, a, wg(2, 92), 1.3, a[0], Verdict.FORWARD, b, "A's answer to B"),
        (pa, (a[0], 999), DATA, 1.4, a[0], Verdict.NEW_SOURCE, None, "new port, not an init"),
        (pa, (a[0], 999), INIT, 1.5, a[0], Verdict.NEW_SOURCE, None, "init, A still active"),
        (pb, a, DATA, 1.6, b[0], Verdict.WRONG_SOURCE, None, "A cannot inject on B's port"),
        (pa, (a[0], 999), INIT, 31.2, a[0], Verdict.NEW_SOURCE, None, "A quiet, not 30 s"),
        (pa, (a[0], 999), DATA, 31.3, a[0], Verdict.NEW_SOURCE, None, "30 s, not an init"),
        (pa, (a[0], 999), INIT, 31.4, a[0], Verdict.REBOUND, b, "A quiet 30 s: its NAT moved"),
        (pa, a, DATA, 31.5, a[0], Verdict.NEW_SOURCE, None, "the old address is gone"),
    ]
    for port, source, data, now, observed, verdict, destination, intent in rows:
        assert send(port, source, data, now, observed) == (verdict, destination), intent
    # A node that asks for the slot again has lost its path through it (its NAT gave it a
    # new port): its next datagram from its IP moves its side, whatever its kind. Until then
    # its bound address still forwards, so an ask of a side that works costs nothing.
    assert slot.let_move(B, 31.6)
    assert send(pa, (a[0], 999), DATA, 31.7, a[0]) == (Verdict.FORWARD, b), "B still bound"
    assert send(pb, ("203.0.113.9", 5), DATA, 32.0, b[0]) == (Verdict.REBOUND, (a[0], 999))
    assert send(pb, b, INIT, 32.1, b[0]) == (Verdict.NEW_SOURCE, None), "moved once, not again"
    assert slot.let_move(B, 32.2)
    assert send(pb, ("203.0.113.9", 5), DATA, 32.3, b[0]) == (Verdict.FORWARD, (a[0], 999)), \
        "sent from where it is bound: it stays there"
    assert send(pb, b, INIT, 32.4, b[0]) == (Verdict.NEW_SOURCE, None), "the ask is answered"
    assert slot.let_move(B, 32.5)
    assert send(pb, b, DATA, 62.5, b[0]) == (Verdict.NEW_SOURCE, None), "an ask lasts 30 s"
    # The pair went direct: the slot forwards nothing, so WireGuard cannot roam back to it,
    # and a paused slot does not stay alive by what still reaches it.
    slot.paused_at = 33.0
    assert send(pa, (a[0], 999), DATA, 33.1, a[0]) == (Verdict.PAUSED, None)
    assert send(pb, ("203.0.113.9", 5), DATA, 33.2, b[0]) == (Verdict.PAUSED, None)
    assert slot.last_active == 32.3


def test_rate_limit_and_slot_limits():
    limits = RelayLimits(slots_per_node=1, packets_per_s=10.0, packets_burst=2)
    table = SlotTable(range(40000, 40004), limits)
    slot, _ = table.allocate(A, B, 0.0)
    with pytest.raises(RequestRefused, match="already holds 1"):
        table.allocate(A, C, 0.0)
    with pytest.raises(RequestRefused, match="itself"):
        table.allocate(C, C, 0.0)
    pa, t = slot.side_of(A).port, RelayTimings()
    verdicts = [slot.receive(pa, ("1.2.3.4", 5), DATA, 0.0, "1.2.3.4", limits, t)[0]
                for _ in range(3)]
    assert verdicts == [Verdict.BOUND, Verdict.PEER_UNBOUND, Verdict.RATE]
    assert slot.receive(pa, ("1.2.3.4", 5), DATA, 0.1, "1.2.3.4", limits, t)[0] \
        is Verdict.PEER_UNBOUND  # 0.1 s refilled one token


def test_expiry():
    t = RelayTimings(bind_timeout_s=5.0, idle_timeout_s=10.0)
    table = SlotTable(range(40000, 40004))
    slot, _ = table.allocate(A, B, 0.0)
    assert table.expired(4.9, t) == []
    assert table.expired(5.0, t) == [slot]  # never bound
    for side, ip in ((slot.a, "1.1.1.1"), (slot.b, "2.2.2.2")):
        slot.receive(side.port, (ip, 1), DATA, 6.0, ip, table.limits, t)
    assert table.expired(15.9, t) == []
    assert table.expired(16.0, t) == [slot]
    table.release(slot)
    assert len(table) == 0 and set(table.allocate(A, C, 30.0)[0].sides) == {40000, 40001}


# -- real sockets on loopback -----------------------------------------------------------------


def udp(ip: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((ip, 0))
    sock.setblocking(False)
    return sock


async def recv(sock: socket.socket, wait_s: float = 2.0) -> bytes | None:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(wait_s):
            return await loop.sock_recv(sock, 65535)
    except TimeoutError:
        return None


def free_ports(count: int) -> range:
    """`count` consecutive UDP ports free on loopback right now."""
    while True:
        probe = udp("127.0.0.1")
        start = probe.getsockname()[1]
        probe.close()
        if start + count > 65535:
            continue
        socks = []
        try:
            for port in range(start, start + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return range(start, start + count)
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()


async def test_relay_forwards_between_bound_sides_only():
    observed = {A: "127.0.0.1", B: "127.0.0.1"}
    relay = Relay(observed.get, ports=free_ports(4), host="127.0.0.1")
    await relay.start()
    a, b, third = udp("127.0.0.1"), udp("127.0.0.1"), udp("127.0.0.2")
    try:
        lease_a, lease_b = relay.allocate(A, B)
        assert (lease_a.peer, lease_b.peer) == (B, A) and lease_a.created
        assert relay.allocate(B, A)[1].port == lease_a.port  # one slot per pair
        to_a, to_b = ("127.0.0.1", lease_a.port), ("127.0.0.1", lease_b.port)
        a.sendto(INIT, to_a)  # binds A; B unbound: dropped
        b.sendto(b"hello" * 20, to_b)  # not WireGuard: binds nothing
        assert await recv(a, 0.3) is None
        b.sendto(INIT, to_b)  # binds B, delivered to A from B's relay port
        assert await recv(a) == INIT
        response = wg(2, 92)
        a.sendto(response, to_a)
        assert await recv(b) == response
        # A third host cannot inject on either port, nor take a side over.
        for port in (lease_a.port, lease_b.port):
            third.sendto(DATA, ("127.0.0.1", port))
            third.sendto(INIT, ("127.0.0.1", port))
        hijack = udp("127.0.0.1")  # A's IP, a new port, while A is active
        hijack.sendto(INIT, to_a)
        a.sendto(DATA, to_a)
        assert await recv(b) == DATA  # only A's own datagram came through
        assert await recv(b, 0.3) is None and await recv(a, 0.1) is None
        hijack.close()
        assert relay.counts[Verdict.WRONG_SOURCE] == 4
        assert relay.counts[Verdict.NEW_SOURCE] == 1
        assert relay.counts[Verdict.NOT_WIREGUARD] == 1
        metrics = relay.metrics_counts()
        assert (metrics.slots, metrics.kernel_slots) == (1, 0)
        assert metrics.packets == {"userspace": 3, "kernel": 0}
        assert metrics.bytes["userspace"] == 148 + 92 + 96
        # Unbound: a's first initiation, which bound a's side while b's was not.
        assert metrics.dropped == {"source": 4, "new_source": 1, "shape": 1, "unbound": 1}
        # A burst (within the receiver's buffer) all arrives, in order.
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        burst = [bytes([4, 0, 0, 0]) + i.to_bytes(4, "big") + bytes(1400 - 8 + 8)
                 for i in range(200)]
        for data in burst:
            a.sendto(data, to_a)
        got = []
        while len(got) < len(burst) and (data := await recv(b, 1.0)) is not None:
            got.append(data)
        assert got == burst
    finally:
        for sock in (a, b, third):
            sock.close()
        await relay.close()
    assert not relay._sockets and len(relay.table) == 0


async def test_idle_slots_end_and_ports_come_back():
    now = [0.0]
    relay = Relay({}.get, ports=free_ports(2), host="127.0.0.1", clock=lambda: now[0],
                  timings=RelayTimings(bind_timeout_s=1.0, sweep_s=0.01))
    await relay.start()
    try:
        relay.allocate(A, B)
        with pytest.raises(RequestRefused, match="no free relay ports"):
            relay.allocate(A, C)
        now[0] = 1.0
        deadline = time.monotonic() + 2
        while len(relay.table):
            assert time.monotonic() < deadline, "the unbound slot did not expire"
            await asyncio.sleep(0.01)
        mine, theirs = relay.allocate(A, C)  # the range holds one slot: its ports are free
        assert {mine.port, theirs.port} == set(relay.table.ports)
    finally:
        await relay.close()
