"""node/natidle.py: what a measurement of our NAT's idle timeout means (a table), the real
probe against the registry's real probe server on loopback, and the keepalive change on a real
wireguard-go device: only lower, only that field. The lab test (test_nat_timeout_lab.py)
runs it behind a NAT that forgets."""

from __future__ import annotations

import asyncio
import shutil
import socket

import pytest

from wgpair import wg_pair
from wgpunch.node.natidle import Idle, IdleTimings, IdleWatch, lowered, probe_idle, verdict
from wgpunch.registry.natprobe import ProbeSettings, answers
from wgpunch.wg.model import Endpoint

LADDER = (2, 4, 7, 10, 13, 16, 19, 22, 26)


@pytest.mark.parametrize(("intent", "heard", "lost", "idle", "keepalive"), [
    ("every later answer came: 25 s keeps the mapping", LADDER, (), Idle(26, None), None),
    ("a 20 s NAT: 19 s kept, 22 s lost", LADDER[:7], (22,), Idle(19, 22), 18),
    ("the lab test's 8 s NAT", LADDER[:3], (10,), Idle(7, 10), 6),
    ("lost between 22 and 26: the keepalive may be too long", LADDER[:8], (26,),
     Idle(22, 26), 21),
    ("nothing kept even 2 s: the least keepalive", (), (2,), Idle(0, 2), 1),
    ("a longer delay heard past a lost one counts", (2, 4, 10), (7, 13), Idle(10, 13), 9),
    ("the long rungs told nothing (datagrams lost): not measured", (2, 4, 7), (), None, None),
    ("nothing at all: not measured", (), (), None, None),
])
def test_verdict(intent, heard, lost, idle, keepalive):
    assert verdict(max(LADDER), heard, lost) == idle
    if idle is not None:
        assert idle.keepalive_s(25) == keepalive


def test_the_words_say_what_was_measured():
    assert Idle(19, 22).words() == (
        "our NAT forgets idle UDP mappings after 19-22 s without a packet")
    assert Idle(26, None).words() == "our NAT keeps idle UDP mappings at least 26 s"
    assert Idle(0, 2).words() == "our NAT forgets idle UDP mappings within 2 s"


@pytest.mark.parametrize(("intent", "current", "safe", "live", "want"), [
    ("the agent's 25 s, lowered", 25, 6, True, 6),
    ("lowered without a session too", 25, 6, False, 6),
    ("already short enough: untouched", 5, 6, True, None),
    ("equal: untouched", 6, 6, True, None),
    ("none on a live session (the peer reached us): nothing of ours keeps it", 0, 6, True, 6),
    ("none and no session: set with the endpoint later", 0, 6, False, None),
    ("our NAT keeps mappings long enough: untouched", 25, None, True, None),
    ("... also without a keepalive", 0, None, True, None),
])
def test_lowered_only_lowers(intent, current, safe, live, want):
    assert lowered(current, safe, live=live) == want


class Loopback(asyncio.DatagramProtocol):
    """The registry's answers (registry/natprobe.py `answers`) on a loopback socket: the
    ProbeServer itself listens on every address of the host, which a test here must not."""

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        loop = asyncio.get_running_loop()
        observed = Endpoint.parse(f"{addr[0]}:{addr[1]}")
        for _, reply, after_s in answers(data, observed, ProbeSettings(0)):
            loop.call_later(after_s, self.transport.sendto, reply, addr)


async def test_the_real_probe_against_the_registrys_answers():
    """On loopback nothing forgets: every later answer comes."""
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        Loopback, local_addr=("127.0.0.1", 0))
    try:
        port = transport.get_extra_info("sockname")[1]
        found = await probe_idle(Endpoint.parse(f"127.0.0.1:{port}"), (1, 2), IdleTimings())
    finally:
        transport.close()
    assert found == Idle(2, None)


async def test_a_probe_port_that_does_not_answer_measures_nothing():
    port = _free_udp_port()
    found = await probe_idle(Endpoint.parse(f"127.0.0.1:{port}"), (1, 2),
                             IdleTimings(first_wait_s=0.2))
    assert found is None


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.lab
@pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="wireguard-go not installed")
def test_only_the_keepalive_of_a_peer_with_one_is_lowered(tmp_path):
    with wg_pair(tmp_path) as (a, b):
        a.wg_set("peer", b.public.base64(), "persistent-keepalive", "25",
                 "endpoint", f"{b.veth_ip}:51820")
        before = a.wg_show_dump()[1]

        async def run() -> list[str]:
            nudged: list[str] = []

            async def nudge(peer):
                nudged.append(peer.public_key.base64())

            watch = IdleWatch(_measured(Idle(7, 10)), IdleTimings(), 25, lambda: None)
            assert await watch.watch_once(Endpoint.parse("192.0.2.9:1"))
            assert watch.keepalive_s() == 6
            state = await a.device.state()
            await watch.keep_open(a.device, state.peers[0], live=True, nudge=nudge)
            # Lowered already: nothing more, however often the agent's loop asks.
            state = await a.device.state()
            await watch.keep_open(a.device, state.peers[0], live=True, nudge=nudge)
            return nudged

        assert asyncio.run(run()) == [b.public.base64()]
        after = a.wg_show_dump()[1]
        assert after[-1] == "6" and after[:-1] == before[:-1]
        # A peer without a keepalive and without a session keeps none.
        b.wg_set("peer", a.public.base64(), "persistent-keepalive", "0")

        async def untouched() -> None:
            watch = IdleWatch(_measured(Idle(7, 10)), IdleTimings(), 25, lambda: None)
            await watch.watch_once(Endpoint.parse("192.0.2.9:1"))
            state = await b.device.state()
            await watch.keep_open(b.device, state.peers[0], live=False, nudge=_never)

        asyncio.run(untouched())
        assert b.wg_show_dump()[1][-1] == "off"


def _measured(idle: Idle):
    async def probe(server, ladder, t):
        return idle
    return probe


async def _never(peer):
    raise AssertionError("nudged a peer that was not lowered")
