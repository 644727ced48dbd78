"""registry/natprobe.py in process: what each probe is answered with, from where, and that
nobody gets more bytes than they send or more answers than the per-source limit; the lab
test (test_natcheck_lab.py) runs it on real sockets behind every NAT kind."""

import asyncio
import ipaddress
import socket

import pytest

from wgpunch.errors import ConfigError, MalformedPacket
from wgpunch.protocol.probewire import SIZE, Ask, Request, Via, parse_reply
from wgpunch.registry.natprobe import ProbeServer, ProbeSettings, answers
from wgpunch.wg.model import Endpoint

TXID = bytes(range(16))
NODE = Endpoint.parse("198.51.100.2:40001")
SECOND = ipaddress.ip_address("192.0.2.66")
FULL = ProbeSettings(51822, 51823, SECOND)
BOTH = Ask.ALT_PORT | Ask.ALT_ADDRESS


@pytest.mark.parametrize(("intent", "settings", "ask", "vias"), [
    ("a plain probe: one reply", FULL, Ask.NONE, [Via.PROBE_PORT]),
    ("both alternates asked and offered", FULL, BOTH,
     [Via.PROBE_PORT, Via.ALT_PORT, Via.ALT_ADDRESS]),
    ("the second port only", FULL, Ask.ALT_PORT, [Via.PROBE_PORT, Via.ALT_PORT]),
    ("alternates asked, none offered", ProbeSettings(51822), BOTH, [Via.PROBE_PORT]),
    ("a later answer too", ProbeSettings(51822), Ask.LATER, [Via.PROBE_PORT, Via.LATER]),
])
def test_answers(intent, settings, ask, vias):
    request = Request(TXID, ask, 7 if ask & Ask.LATER else 0).encode()
    got = answers(request, NODE, settings)
    assert [answer.via for answer in got] == vias
    assert len(got) * SIZE <= len(request)  # never an amplifier
    for via, data, _ in got:
        reply = parse_reply(data)
        assert (reply.txid, reply.via, reply.observed) == (TXID, via, NODE)
        assert reply.alt_port == settings.alt_port and reply.alt_address == settings.alt_address


def test_a_later_answer_leaves_when_asked():
    got = answers(Request(TXID, Ask.LATER, 7).encode(), NODE, FULL)
    assert [(a.via, a.after_s) for a in got] == [(Via.PROBE_PORT, 0.0), (Via.LATER, 7.0)]


def test_an_ipv6_node_is_not_told_of_an_ipv4_second_address():
    got = answers(Request(TXID, BOTH).encode(), Endpoint.parse("[2001:db8::2]:4000"), FULL)
    assert [answer.via for answer in got] == [Via.PROBE_PORT, Via.ALT_PORT]
    assert parse_reply(got[0][1]).alt_address is None


def test_malformed_is_refused():
    with pytest.raises(MalformedPacket):
        answers(b"GET / HTTP/1.0\r\n\r\n", NODE, FULL)


class Recorder:
    def __init__(self):
        self.sent = []

    def send(self, data, to):
        self.sent.append((data, to))


def test_each_source_is_limited_and_bad_datagrams_are_counted():
    now = [0.0]
    server = ProbeServer(ProbeSettings(51822), burst=3, per_s=1.0, clock=lambda: now[0])
    probe = Recorder()
    request = Request(TXID).encode()
    for _ in range(5):
        server.received(request, ("198.51.100.2", 40001), probe)
    server.received(request, ("203.0.113.7", 5), probe)  # another source has its own budget
    server.received(b"junk", ("203.0.113.8", 5), probe)
    server.received(request, ("203.0.113.9", 0), probe)  # port 0 cannot be answered
    assert [to for _, to in probe.sent] == [("198.51.100.2", 40001)] * 3 + [("203.0.113.7", 5)]
    assert server.counts == {"answered": 4, "rate_limited": 2, "malformed": 1, "bad_source": 1}
    now[0] = 1.0  # a token back
    server.received(request, ("198.51.100.2", 40001), probe)
    assert len(probe.sent) == 5


class LaterRecorder(Recorder):
    def __init__(self):
        super().__init__()
        self.later = asyncio.Event()

    def send(self, data, to):
        super().send(data, to)
        if parse_reply(data).via is Via.LATER:
            self.later.set()


async def test_later_answers_come_later_and_only_so_many_wait():
    server = ProbeServer(ProbeSettings(51822), max_pending=1)
    probe = LaterRecorder()
    later = Request(TXID, Ask.LATER, 1).encode()
    started = asyncio.get_running_loop().time()
    server.received(later, ("198.51.100.2", 40001), probe)
    server.received(later, ("203.0.113.7", 5), probe)  # a second one waiting: one too many
    assert [parse_reply(data).via for data, _ in probe.sent] == [Via.PROBE_PORT] * 2
    assert server.counts == {"answered": 2, "later_dropped": 1}
    async with asyncio.timeout(3):
        await probe.later.wait()
    data, to = probe.sent[2]
    assert (parse_reply(data).via, to) == (Via.LATER, ("198.51.100.2", 40001))
    assert asyncio.get_running_loop().time() - started >= 1.0
    server.received(later, ("203.0.113.7", 5), probe)
    await server.close()  # a later answer still waiting is not sent
    await asyncio.sleep(0)
    assert len(probe.sent) == 4 and not server._pending


async def test_a_port_in_use_is_one_config_error():
    """The probe port taken by a program that does not share it (here on loopback, so that
    nothing of the test listens on the host's other addresses): a one-line ConfigError."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        server = ProbeServer(ProbeSettings(port, None))
        with pytest.raises(ConfigError, match=f"cannot listen on 0.0.0.0:{port}: Address "
                                              "already in use"):
            await server.start()
