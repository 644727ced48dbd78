"""The real node agent in this test's event loop (tests/agentrig.py: a fake registry, a real
wireguard-go device in a throwaway network namespace, and senders that only record). This
process sends no packet itself: what leaves goes out of wireguard-go, or
of a fake probe that answers with a `ping` run in the device's namespace.

What the lab tests (test_core_loop.py, test_rebinding.py, test_collision.py) prove with the
real processes in minutes, the agent's own part of it, here in seconds. Waits poll with a
deadline; the few fixed durations bound negative claims and are named in the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import replace
from typing import Any

import pytest

import agentrig
from agentrig import (
    FAST,
    FAST_REGISTRY,
    LAN_ADDRESS,
    MEASURED_TTL,
    OUR_ADDRESSES,
    REGISTRY_ENDPOINT,
    FakeIo,
    Pair,
    Running,
    SkipClock,
    agent_for,
    events,
)
from polling import poll
from wgpair import PORT
from wgpunch import __version__
from wgpunch.errors import ApiError
from wgpunch.keys import generate_keypair
from wgpunch.node import pathfile
from wgpunch.node.follow import RegistryTimings
from wgpunch.node.portmap.rule import HOLD_BACK_ATTEMPTS
from wgpunch.protocol import (
    Heartbeat,
    PeerEvent,
    PeerRecord,
    RemovedEvent,
    Reported,
    initiator,
)
from wgpunch.wg.model import Endpoint, PeerState
from wgpunch.wg.uapi import UapiDevice

# The rig's fixtures: the device pair, the fake registry and senders, its logging.
pair, registry, io = agentrig.pair, agentrig.registry, agentrig.io
agent_logs = agentrig.agent_logs

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="wireguard-go not installed"),
]

# -- helpers -----------------------------------------------------------------------------------


async def b_handshakes_first(pair: Pair) -> PeerState:
    """A live session that b started (handshake-now needs b's keepalive, whose next packet
    is 25 s away: longer than any test); a's device roams to b's endpoint. Returns a's view
    of b."""
    await pair.b.device.handshake_now(pair.a.public, Endpoint.parse(f"{pair.a.veth_ip}:{PORT}"))
    return await poll(lambda: handshaked(pair), what="a to see b's handshake")


async def handshaked(pair: Pair, endpoint: Endpoint | None = None) -> PeerState | None:
    peer = await pair.peer(pair.b.public)
    if peer.latest_handshake is None or (endpoint is not None and peer.endpoint != endpoint):
        return None
    return peer


# -- 1. first contact --------------------------------------------------------------------------


async def test_first_contact_reports_once_the_stream_is_open_then_requests_a_punch(
        pair, registry, io):
    """Nothing is reported before the watch stream delivered (the agent has read its
    addresses by then); then the report (listen port, our addresses, version) goes first and
    the punch request for b, which has no session, after it."""
    async with Running(agent_for(pair, registry, io)) as run:
        await run.until(lambda: io.address_lookups, what="the agent to read its addresses")
        assert await run.holds(lambda: not registry.of("report"), duration=0.3)
        assert registry.of("watch") == [(None, None)]

        registry.publish(*pair.records())
        await run.until(lambda: registry.of("punch"), what="a punch request")
        assert [name for name, _ in registry.calls][:3] == ["watch", "report", "punch"]
        [(report, delivered)] = registry.of("report")
        assert delivered >= 1  # sent after the stream's first item
        assert report == Reported(PORT, tuple(OUR_ADDRESSES), __version__)
        assert io.address_lookups == [pair.a.ifname]
        assert registry.of("punch") == [pair.b.public]


@pytest.mark.parametrize("failure", ["refused", "unsendable"])
async def test_a_failed_report_does_not_hold_back_punch_requests(pair, registry, io, failure):
    """Refused by the registry, or impossible to make (an address no report may carry)."""
    if failure == "refused":
        registry.report_error = ApiError("registry: PUT /v1/self: 503 busy", 503)
    else:
        io.addresses = [ipaddress.ip_interface("224.0.0.1/32")]
    async with Running(agent_for(pair, registry, io)) as run:
        registry.publish(*pair.records())
        await run.until(lambda: registry.of("punch"), what="a punch request")
        assert len(registry.of("report")) == (1 if failure == "refused" else 0)


# -- 2. punch events ---------------------------------------------------------------------------


async def test_the_initiator_handshakes_now_toward_the_punch_events_endpoint(pair, registry, io):
    """b's wireguard-go answers the initiation: a's device holds b's endpoint and a fresh
    handshake; no opener was sent."""
    registry.answer_punches = True
    async with Running(agent_for(pair, registry, io)) as run:
        registry.publish(*pair.records())
        peer = await run.until(lambda: handshaked(pair, pair.b_endpoint),
                               what="a handshake with b at its endpoint")
        assert peer.persistent_keepalive == 25
        assert io.opened == []


async def test_the_non_initiator_opens_its_nat_and_never_handshakes_while_it_can_open(
        pair, registry, io):
    """On each punch event (one per retry, 1 s here) an opener leaves from the WireGuard
    port toward b's endpoint, with the TTL measured toward the registry; a's device keeps b
    without an endpoint: no initiation of ours could cross b's."""
    registry.answer_punches = False
    async with Running(agent_for(pair, registry, io)) as run:
        registry.publish(*pair.records())
        await run.until(lambda: io.opened, what="an opener")
        assert await run.holds(lambda: _no_endpoint(pair), duration=1.0)
        assert len(io.opened) >= 2, io.opened  # the retries open again
        assert set(io.opened) == {(PORT, pair.b_endpoint, MEASURED_TTL)}
        assert io.measured_toward == [REGISTRY_ENDPOINT.ip]


async def test_with_ipv6_on_both_sides_the_opener_goes_to_both_families(pair, registry):
    """b reported an IPv6 endpoint and we have a global IPv6 address: each punch event's
    opener goes to b's IPv6 endpoint (hop limit 64: no NAT to stop short of) and to its IPv4
    one (the measured TTL), and our own report lists our IPv6 endpoint."""
    ours6 = ipaddress.ip_interface("2001:db8:1::a/64")
    io = FakeIo(addresses=[*agentrig.OUR_INTERFACES, ours6])
    b6 = Endpoint.parse(f"[2001:db8:2::a]:{PORT}")
    registry.answer_punches = False
    a, b, reg = pair.records()
    assert b.reported is not None
    dual_b = replace(b, reported=replace(b.reported, ipv6=(b6,)))
    async with Running(agent_for(pair, registry, io)) as run:
        registry.publish(a, dual_b, reg)
        await run.until(lambda: len(io.opened) >= 2, what="openers")
        assert set(io.opened[:2]) == {(PORT, b6, 64), (PORT, pair.b_endpoint, MEASURED_TTL)}
        assert await _no_endpoint(pair)
        report, _ = registry.of("report")[-1]
        assert report.ipv6 == (Endpoint(ours6.ip, PORT),)


async def _no_endpoint(pair: Pair) -> bool:
    return (await pair.peer(pair.b.public)).endpoint is None


async def test_the_non_initiator_without_raw_sockets_handshakes_instead(pair, registry):
    io = FakeIo(raw=False)
    registry.answer_punches = False
    async with Running(agent_for(pair, registry, io)) as run:
        registry.publish(*pair.records())
        await run.until(lambda: handshaked(pair, pair.b_endpoint), what="a handshake with b")
        assert io.opened == [] and io.measured_toward == []


async def test_the_punch_events_initiator_field_wins_over_the_key_order(pair, registry, io):
    """The registry decides who initiates; the node follows it even where its own rule
    (lower key) would say the opposite."""
    says = not initiator(pair.a.public, pair.b.public)
    registry.answer_punches = says
    async with Running(agent_for(pair, registry, io)) as run:
        registry.publish(*pair.records())
        if says:
            await run.until(lambda: handshaked(pair, pair.b_endpoint), what="a handshake")
            assert io.opened == []
        else:
            await run.until(lambda: io.opened, what="an opener")
            assert await _no_endpoint(pair)


async def test_a_peer_with_a_port_mapping_is_initiated_toward_it_whatever_the_registry_says(
        pair, registry, io):
    """b reported a mapping (where its wireguard-go is; its observed endpoint leads nowhere):
    a sends the initiation there although the punch events call b the initiator, and opens
    nothing (node/portmap/rule.py)."""
    registry.answer_punches = False
    unreachable = Endpoint.parse(f"198.51.100.99:{PORT}")
    mapped_b = PeerRecord(pair.b.public, (), unreachable, None,
                          Reported(PORT, (LAN_ADDRESS,), "test", pair.b_endpoint), 0)
    a, _, reg = pair.records()
    async with Running(agent_for(pair, registry, io)) as run:
        registry.publish(a, mapped_b, reg)
        await run.until(lambda: handshaked(pair, pair.b_endpoint),
                        what="a handshake with b at its mapping")
        assert io.opened == []


@pytest.mark.parametrize("raw", [True, False])
async def test_with_a_mapping_of_its_own_it_sends_nothing_toward_a_peer_without_one(
        pair, registry, raw):
    """a has a mapping, b has none: b sends to a's mapping, so a reports it and sends
    neither an opener nor an initiation toward b, even on punch events naming a the
    initiator; it still asks for punches (b needs them to send). Only after
    HOLD_BACK_ATTEMPTS punch requests without a session (a mapping may lead nowhere) does it
    punch as the side b initiates toward: an opener, or without raw sockets a handshake."""
    io = FakeIo(raw=raw)
    registry.answer_punches = True
    ours = Endpoint.parse(f"198.51.100.1:{PORT}")
    rounds = replace(FAST, first_retry_s=0.4, max_retry_s=0.4)  # a round every 0.4 s
    agent = agent_for(pair, registry, io, timings=rounds)
    agent.view.set_mapped(ours)  # what the port-mapping task does once the NAT mapped

    def sent() -> Any:
        return io.opened if raw else handshaked(pair, pair.b_endpoint)

    async with Running(agent) as run:
        registry.publish(*pair.records())
        await run.until(lambda: len(registry.of("punch")) >= HOLD_BACK_ATTEMPTS - 1,
                        what="punch requests")
        assert await _no_endpoint(pair) and io.opened == []
        await run.until(sent, what="our side punching after the rounds held back")
        assert len(registry.of("punch")) >= HOLD_BACK_ATTEMPTS
        [(report, _)] = registry.of("report")
        assert report.mapped == ours


async def test_the_initiator_leaves_a_punch_alone_until_the_peer_has_reported(
        pair, registry, io):
    """A punch event for a peer whose agent has not reported itself could reach a NAT not
    yet opened (the `collision` lab): the initiator leaves it alone; once the peer reports,
    it asks for a punch again and handshakes on the event."""
    async with Running(agent_for(pair, registry, io)) as run:
        registry.publish(*pair.records(b_reported=False))
        registry.punch_event(pair.b.public, initiator=True)
        await run.until(lambda: registry.delivered >= 2, what="the punch event to arrive")
        assert await run.holds(lambda: _no_endpoint(pair), duration=0.5)

        registry.answer_punches = True
        registry.change(pair.record(pair.b.public, pair.b_endpoint))
        await run.until(lambda: handshaked(pair, pair.b_endpoint), what="a handshake")
        assert set(registry.of("punch")) == {pair.b.public}


async def test_a_failed_punch_request_makes_it_handshake_alone(pair, registry, io):
    registry.punch_error = ApiError("registry: POST /v1/punch: connection refused")
    async with Running(agent_for(pair, registry, io)) as run:
        registry.publish(*pair.records())
        await run.until(lambda: handshaked(pair, pair.b_endpoint), what="a handshake")
        assert registry.of("punch")


# -- 3. what the agent never touches -----------------------------------------------------------


async def test_a_peer_the_registry_does_not_know_and_the_registry_peer_are_never_touched(
        pair, registry, io):
    registry.answer_punches = True
    before = {key: await pair.peer(key) for key in (pair.registry, pair.stranger)}
    async with Running(agent_for(pair, registry, io)) as run:
        registry.publish(*pair.records())
        await run.until(lambda: _path(pair) == "direct", what="b's path to go direct")
        registry.punch_event(pair.registry, initiator=True)  # the registry never does this
        registry.punch_event(pair.b.public, initiator=True)  # a live session: a probe
        await run.until(lambda: io.probes, what="the probe for b's punch event")
        assert set(pair.paths()) == {pair.b.public.base64()}
    assert registry.of("punch") == [pair.b.public]
    assert io.probes == [(pair.a.ifname, ipaddress.ip_address(pair.b.tunnel_ip))]
    assert io.opened == []
    after = {key: await pair.peer(key) for key in (pair.registry, pair.stranger)}
    assert after == before


# -- 4. a working path is never overwritten ----------------------------------------------------


async def test_a_live_session_stays_when_the_registry_reports_another_endpoint_and_the_probe_is_answered(  # noqa: E501
        pair, registry, caplog):
    """The registry reports b elsewhere (a bogus port): a probes the current path, b
    answers, and the session stays where it is, with the same handshake."""
    io = FakeIo(answer_from=pair.a.ns)
    live = await b_handshakes_first(pair)
    bogus = Endpoint.parse(f"{pair.b.veth_ip}:4444")
    async with Running(agent_for(pair, registry, io)) as run:
        registry.publish(*pair.records())
        await run.until(lambda: _path(pair) == "direct", what="the agent to see b direct")
        registry.change(pair.record(pair.b.public, bogus))
        await run.until(lambda: [r for r in caplog.records if "left alone" in r.getMessage()],
                        what="the probe to be answered")
        assert await run.holds(lambda: _still(pair, live), duration=2 * FAST.probe_timeout_s)
    assert io.probes == [(pair.a.ifname, ipaddress.ip_address(pair.b.tunnel_ip))]
    assert not events(caplog, "repoint")


async def _still(pair: Pair, live: PeerState) -> bool:
    now = await pair.peer(pair.b.public)
    return (now.endpoint, now.latest_handshake) == (live.endpoint, live.latest_handshake)


def _path(pair: Pair) -> str | None:
    shown = pair.paths().get(pair.b.public.base64())
    return None if shown is None else shown.path


async def test_an_unanswered_probe_moves_the_live_session_to_the_reported_endpoint(
        pair, registry, io, caplog):
    """NAT rebinding (the `rebind` lab): the registry reports b on a new port; the probe of
    the current path goes unanswered for probe_timeout_s, so a moves the session there,
    keeping its keys (same handshake), and probes again."""
    live = await b_handshakes_first(pair)
    moved = Endpoint.parse(f"{pair.b.veth_ip}:4444")
    async with Running(agent_for(pair, registry, io)) as run:
        registry.publish(*pair.records())
        await run.until(lambda: _path(pair) == "direct", what="the agent to see b direct")
        registry.change(pair.record(pair.b.public, moved))
        await run.until(lambda: io.probes, what="a probe")
        peer = await run.until(lambda: _at(pair, moved), what="the repoint")
        # From the probe as it went, not as the poll saw it: a loaded machine sees it late.
        took = time.monotonic() - io.probe_times[0]
    assert peer.latest_handshake == live.latest_handshake
    assert took >= FAST.probe_timeout_s - 0.05, took
    [repoint] = events(caplog, "repoint")
    assert repoint.to == str(moved)  # type: ignore[attr-defined]
    assert len(io.probes) >= 2 and set(io.probes) == {
        (pair.a.ifname, ipaddress.ip_address(pair.b.tunnel_ip))}


async def _at(pair: Pair, endpoint: Endpoint) -> PeerState | None:
    peer = await pair.peer(pair.b.public)
    return peer if peer.endpoint == endpoint else None


async def test_a_live_session_that_sends_but_hears_nothing_is_probed_then_asks_for_a_punch(
        pair, registry, io, caplog):
    """A NAT on the way lost its state (the `flush` lab): b hears nothing any more (its
    wireguard-go stopped), a's pings go out unanswered. After stall_s a probes; the probe
    unanswered too, a asks the registry for a punch, which makes b send."""
    await b_handshakes_first(pair)
    daemon = pair.b.daemon.proc
    assert daemon is not None
    timings = replace(FAST, stall_s=0.3)
    async with Running(agent_for(pair, registry, io, timings=timings)) as run:
        registry.publish(*pair.records())
        await run.until(lambda: _path(pair) == "direct", what="the agent to see b direct")
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            ping = await asyncio.create_subprocess_exec(
                *pair.a.ns.argv(["ping", "-n", "-c", "3", "-i", "0.2", "-W", "1",
                                 pair.b.tunnel_ip]),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                await run.until(lambda: events(caplog, "stall"), what="the stall")
                await run.until(lambda: registry.of("punch"), what="the punch request")
            finally:
                with contextlib.suppress(ProcessLookupError):
                    ping.kill()
                await ping.wait()
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
    assert registry.of("punch") == [pair.b.public]
    assert io.probes[:1] == [(pair.a.ifname, ipaddress.ip_address(pair.b.tunnel_ip))]


# -- 5. the registry's stream ------------------------------------------------------------------


async def test_a_registry_restart_makes_it_report_again(pair, registry, io, caplog):
    async with Running(agent_for(pair, registry, io)) as run:
        registry.publish(*pair.records(), epoch="e1")
        await run.until(lambda: registry.of("report"), what="the first report")
        registry.push(ApiError("registry: watch stream ended"))
        await run.until(lambda: len(registry.of("watch")) == 2, what="a reconnect")
        registry.publish(*pair.records(), epoch="e2")
        await run.until(lambda: len(registry.of("report")) == 2, what="a second report",
                        within_s=2.0)  # far sooner than the periodic report (60 s)
    assert registry.of("watch")[1] == (1, "e1")
    assert [r for r in caplog.records
            if r.getMessage() == "registry restarted (new epoch): resynced 3 peers"]


async def test_a_failing_watch_stream_backs_off_and_resumes_where_it_was(pair, registry, io):
    """The stream resumes from the last history revision and epoch (punch events and
    heartbeats are not history); a stream that fails again waits twice as long."""
    async with Running(agent_for(pair, registry, io)) as run:
        registry.publish(*pair.records())  # revision 1
        registry.push(RemovedEvent(7, pair.stranger))
        registry.push(Heartbeat(9))
        registry.punch_event(pair.b.public, initiator=False)
        registry.push(ApiError("registry: watch stream ended"))
        await run.until(lambda: len(registry.of("watch")) == 2, what="a reconnect")
        registry.push(ApiError("registry: watch: 502"))  # fails at once: nothing heard
        await run.until(lambda: len(registry.of("watch")) == 3, what="a second reconnect")
        registry.push(PeerEvent(8, pair.record(pair.b.public, pair.b_endpoint)))
        await run.until(lambda: registry.delivered == 5, what="the stream to deliver again")
    assert registry.of("watch") == [(None, None), (7, "e1"), (7, "e1")]
    first, second = (b - a for a, b in zip(registry.watch_times, registry.watch_times[1:],
                                           strict=False))
    low = FAST_REGISTRY.reconnect_first_s
    assert 0.8 * low <= first < second and second >= 2 * 0.8 * low, (first, second)


async def test_a_stream_that_ends_makes_it_probe_every_live_peer(pair, registry, io):
    """A stream that worked and went silent: our NAT may have lost its state; a probe to
    each peer with a live session (only b has one) reopens it."""
    await b_handshakes_first(pair)
    async with Running(agent_for(pair, registry, io)) as run:
        registry.publish(*pair.records())
        await run.until(lambda: _path(pair) == "direct", what="the agent to see b direct")
        registry.push(ApiError("registry: watch: timeout"))
        await run.until(lambda: io.probes, what="a probe")
    assert io.probes == [(pair.a.ifname, ipaddress.ip_address(pair.b.tunnel_ip))]


# -- 6. run_once -------------------------------------------------------------------------------


async def test_run_once_handshakes_every_peer_without_a_live_session_and_counts_failures(
        pair, registry, io, caplog):
    """b (endpoint known) gets handshake-now; the stranger's lookup failed and a peer whose
    endpoint the device rejects fails: 2 failures; the registry's own peer is left alone. A
    second pass leaves b's live session alone whatever the registry says, until the clock
    passes the session's end."""
    _, rejected = generate_keypair()
    pair.a.wg_set("peer", rejected.base64(), "allowed-ips", "10.77.0.4/32")
    registry.snapshot_of(*pair.records(), pair.record(
        rejected, Endpoint(ipaddress.IPv6Address("fe80::1%nosuchinterface"), 1)))
    registry.failed_lookups.add(pair.stranger)
    clock = SkipClock()
    agent = agent_for(pair, registry, io, clock=clock)
    registry_before = await pair.peer(pair.registry)

    assert await agent.run_once() == 2
    await poll(lambda: handshaked(pair, pair.b_endpoint), what="a handshake with b")
    assert await pair.peer(pair.registry) == registry_before
    assert (await pair.peer(rejected)).endpoint is None  # rolled back

    elsewhere = Endpoint.parse(f"{pair.b.veth_ip}:4444")
    registry.records[pair.b.public] = pair.record(pair.b.public, elsewhere)
    assert await agent.run_once() == 2
    assert (await pair.peer(pair.b.public)).endpoint == pair.b_endpoint  # live: untouched
    clock.skip(FAST.session_live_s)
    assert await agent.run_once() == 2
    assert (await pair.peer(pair.b.public)).endpoint == elsewhere
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"peer {pair.stranger}: lookup failed" in warned
    assert [w for w in warned if w.startswith(f"peer {rejected}:")]
    assert io.opened == [] and io.probes == []


# -- 7. what `wgpunch status` shows, and a device that fails -----------------------------------


async def test_the_path_file_shows_none_then_direct_with_its_since(pair, registry, io):
    async with Running(agent_for(pair, registry, io)) as run:
        registry.publish(*pair.records())
        await run.until(lambda: registry.of("punch"), what="a punch request")
        [(key, shown)] = (await run.until(lambda: pair.paths(), what="the path file")).items()
        assert (key, shown.path, shown.since) == (pair.b.public.base64(), "none", None)
        assert shown.endpoint == str(pair.b_endpoint)
        before = time.time()
        registry.punch_event(pair.b.public, initiator=True)
        await run.until(lambda: _path(pair) == "direct", what="the path to go direct")
        shown = pair.paths()[pair.b.public.base64()]
        assert shown.since is not None and before <= shown.since <= time.time()
        assert shown.reason in ("live session", "live session on the endpoint the registry "
                                "reports")
    assert not pathfile.path_file(pair.a.ifname, pair.tmp).exists()  # removed on the way out


def read_lines(caplog: pytest.LogCaptureFixture, ifname: str) -> list[str]:
    """What the agent logged about reading its device (failures and recoveries)."""
    return [r.getMessage() for r in caplog.records
            if r.getMessage().startswith(f"reading {ifname} ")]


async def test_an_unreadable_device_is_logged_once_and_recovers(pair, registry, io, caplog):
    """wireguard-go stopped (SIGSTOP): every read times out. One error line however many
    reads fail (1 s here: three or more), one line when it reads again; then the agent acts
    on the next punch event as ever."""
    device = UapiDevice(pair.a.ifname, timeout_s=0.2)
    daemon = pair.a.daemon.proc
    assert daemon is not None

    def failed() -> list[str]:
        return read_lines(caplog, pair.a.ifname)

    async with Running(agent_for(pair, registry, io, device=device)) as run:
        registry.publish(*pair.records())
        await run.until(lambda: registry.of("punch"), what="a punch request")
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            await run.until(failed, what="the read error")
            assert await run.holds(lambda: len(failed()) == 1, duration=1.0), failed()
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        await run.until(lambda: len(failed()) == 2, what="the read to work again")
        assert failed() == [
            f"reading {pair.a.ifname} failed: uapi: {pair.a.ifname}: get: no complete reply "
            "within 0.2 s", f"reading {pair.a.ifname} works again"]
        registry.punch_event(pair.b.public, initiator=True)
        await run.until(lambda: handshaked(pair, pair.b_endpoint), what="a handshake")



async def test_a_device_that_disappears_is_logged_once_and_followed_when_it_is_back(
        pair, registry, io, caplog, tmp_path):
    """wg-quick down/up, or wireguard-go restarted: the UAPI socket is gone for a while
    (here a link to the real one, removed and put back). The agent waits for it instead of
    stopping, and acts on the next punch event as ever."""
    sockets = tmp_path / "sockets"
    sockets.mkdir()
    link = sockets / f"{pair.a.ifname}.sock"
    link.symlink_to(UapiDevice(pair.a.ifname).path)
    device = UapiDevice(pair.a.ifname, directory=sockets)

    def failed() -> list[str]:
        return read_lines(caplog, pair.a.ifname)

    async with Running(agent_for(pair, registry, io, device=device)) as run:
        registry.publish(*pair.records())
        await run.until(lambda: registry.of("punch"), what="a punch request")
        link.unlink()
        await run.until(failed, what="the read error")
        assert await run.holds(lambda: len(failed()) == 1, duration=1.0), failed()
        link.symlink_to(UapiDevice(pair.a.ifname).path)
        await run.until(lambda: len(failed()) == 2, what="the read to work again")
        assert "no WireGuard device" in failed()[0]
        registry.punch_event(pair.b.public, initiator=True)
        await run.until(lambda: handshaked(pair, pair.b_endpoint), what="a handshake")


async def test_the_path_file_says_how_the_registry_link_goes(pair, registry, io):
    """`wgpunch status` shows since when the agent follows its registry, or since when it has
    not reached it and why (the link's state changes, not every event, rewrite the file)."""
    def health() -> pathfile.RegistryHealth | None:
        published = pathfile.read_published(pair.a.ifname, pair.tmp)
        return None if published is None else published.registry

    async with Running(agent_for(pair, registry, io)) as run:
        registry.publish(*pair.records())
        following = await run.until(
            lambda: (h := health()) is not None and h.state == "following" and h,
            what="the link to show as following")
        registry.push(ApiError("registry: watch stream ended"))
        lost = await run.until(
            lambda: (h := health()) is not None and h.state == "unreachable" and h,
            what="the link to show as lost")
        registry.publish(*pair.records())
        back = await run.until(
            lambda: (h := health()) is not None and h.state == "following" and h,
            what="the link to show as back")
    assert following.following == registry.following and following.error is None
    assert lost.error == "registry: watch stream ended"
    assert following.since is not None and lost.since is not None and back.since is not None
    assert following.since <= lost.since <= back.since


async def test_a_registry_that_went_away_is_asked_often_at_first_then_less(pair, registry, io,
                                                                           caplog):
    """Retries stay at the fast cap while the registry has been away for less than fast_for_s
    (a registry restarted at once is followed again within that cap), and only then back off
    further. Doubling alone would have made 4 tries in the first second here, not 6 or more."""
    timings = RegistryTimings(reconnect_first_s=0.05, reconnect_fast_max_s=0.1, fast_for_s=1.0,
                              reconnect_max_s=2.0, warn_after_s=0.3)
    for _ in range(40):
        registry.push(ApiError("registry: watch: 503"))
    async with Running(agent_for(pair, registry, io, registry_timings=timings)) as run:
        await run.until(lambda: len(registry.of("watch")) >= 14, what="many reconnects",
                        within_s=10.0)
    start = registry.watch_times[0]
    early = [t for t in registry.watch_times if t - start < 1.0]
    gaps = [b - a for a, b in itertools.pairwise(registry.watch_times)]
    assert len(early) >= 6, gaps
    assert max(gaps) >= 0.8 * 0.2, gaps  # past fast_for_s the pause doubles beyond the cap
    # The same failure, however often retried, is one warning (status says how long).
    assert [r.levelname for r in caplog.records
            if r.getMessage() == "registry: watch: 503"].count("WARNING") == 1
