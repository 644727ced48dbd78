"""The managed mesh (node/mesh.py): the pure plan as a table, then the real agent with `--mesh`
on a real wireguard-go device (tests/agentrig.py's pair and fakes): peers added, updated and
removed as the registry's list changes; a user's peers, the registry's peer and preshared
keys never touched; a restart that changes nothing; overlaps refused with one log line."""

from __future__ import annotations

import ipaddress
import json

import pytest

import agentrig
from agentrig import FakeIo, FakeRegistry, Pair, Running, agent_for, events
from wgpunch.keys import Key, generate_keypair
from wgpunch.node.agent import Agent
from wgpunch.node.mesh import Mesh, Overlap, plan, read_managed, state_file
from wgpunch.protocol import PeerRecord, RemovedEvent
from wgpunch.wg.model import DeviceState, IPNetwork, PeerConfig, PeerState

# The rig's fixtures: the device pair, the fake registry and senders, its logging.
pair, registry, io = agentrig.pair, agentrig.registry, agentrig.io
agent_logs = agentrig.agent_logs


def net(text: str) -> IPNetwork:
    return ipaddress.ip_network(text)


# -- the plan, as a table ------------------------------------------------------------------

ME, REG, USER, M1, M2, NEW = (Key(bytes([n]) * 32) for n in range(1, 7))


def peer(key: Key, *allowed: str) -> PeerState:
    return PeerState(key, None, tuple(net(a) for a in allowed), None, 0, 0, 0, True)


DEVICE = DeviceState("wg0", ME, 51820, 0, (
    peer(REG, "10.0.0.254/32"), peer(USER, "10.0.0.9/32", "192.168.7.0/24"),
    peer(M1, "10.0.0.1/32"), peer(M2, "10.0.0.2/32")))
HUB = DeviceState("wg0", ME, 51820, 0, (peer(REG, "10.0.0.0/24"),))
SELF = {ME: [net("10.0.0.5/32")]}  # every registry's list holds its caller
LISTED = {ME: [net("10.0.0.5/32")], REG: [net("10.0.0.99/32")], M1: [net("10.0.0.1/32")],
          M2: [net("10.0.0.2/32")]}


@pytest.mark.parametrize(("intent", "device", "listed", "managed", "exclude", "want"), [
    ("nothing changed: nothing to do", DEVICE, LISTED, {M1, M2}, set(),
     ((), (), (), {M1, M2}, 0)),
    ("a new peer is added with its allowed IPs only", DEVICE,
     {**LISTED, NEW: [net("10.0.0.3/32")]}, {M1, M2}, set(),
     ((PeerConfig(NEW, allowed_ips=(net("10.0.0.3/32"),)),), (), (), {M1, M2, NEW}, 0)),
    ("a managed peer the registry drops is removed", DEVICE,
     {k: v for k, v in LISTED.items() if k != M2}, {M1, M2}, set(), ((), (), (M2,), {M1}, 0)),
    ("a peer the user added is never removed, even when it was listed before", DEVICE,
     {k: v for k, v in LISTED.items() if k != M2}, {M1}, set(), ((), (), (), {M1}, 0)),
    ("a listed peer the user has is left alone and not taken over", DEVICE,
     {**LISTED, USER: [net("10.0.0.50/32")]}, {M1, M2}, set(), ((), (), (), {M1, M2}, 0)),
    ("the registry's peer and our own key are never added or changed", DEVICE,
     LISTED, set(), set(), ((), (), (), set(), 0)),
    ("a list without ourselves is no whole list: nothing removed", DEVICE,
     {M1: [net("10.0.0.1/32")]}, {M1, M2}, set(), ((), (), (), {M1, M2}, 0)),
    ("an empty list neither", DEVICE, {}, {M1, M2}, set(), ((), (), (), {M1, M2}, 0)),
    ("a managed peer whose allowed IPs changed gets the registry's list", DEVICE,
     {**LISTED, M1: [net("10.0.0.1/32"), net("fd00::1/128")]}, {M1, M2}, set(),
     ((), (PeerConfig(M1, update_only=True, replace_allowed_ips=True,
                      allowed_ips=(net("10.0.0.1/32"), net("fd00::1/128"))),), (), {M1, M2}, 0)),
    ("an excluded peer is not added, and removed if the mesh added it", DEVICE,
     {**LISTED, NEW: [net("10.0.0.3/32")]}, {M1, M2}, {NEW, M2},
     ((), (), (M2,), {M1}, 0)),
    ("a managed peer gone from the device (wg-quick down/up) is added again", DEVICE,
     {**LISTED, NEW: [net("10.0.0.3/32")]}, {M1, M2, NEW}, set(),
     ((PeerConfig(NEW, allowed_ips=(net("10.0.0.3/32"),)),), (), (), {M1, M2, NEW}, 0)),
    ("a recorded peer gone from both is forgotten", DEVICE, LISTED, {M1, M2, NEW}, set(),
     ((), (), (), {M1, M2}, 0)),
    ("a network equal to a user peer's is refused", DEVICE,
     {**LISTED, NEW: [net("10.0.0.9/32")]}, {M1, M2}, set(), ((), (), (), {M1, M2}, 1)),
    ("a network inside a user peer's would take its routes: refused", DEVICE,
     {**LISTED, NEW: [net("192.168.7.8/32")]}, {M1, M2}, set(), ((), (), (), {M1, M2}, 1)),
    ("a network around a user peer's is refused", DEVICE,
     {**LISTED, NEW: [net("10.0.0.0/24")]}, {M1, M2}, set(), ((), (), (), {M1, M2}, 2)),
    ("a managed peer whose new list overlaps stays as it is, still managed", DEVICE,
     {**LISTED, M1: [net("10.0.0.9/32")]}, {M1, M2}, set(), ((), (), (), {M1, M2}, 1)),
    ("inside a hub-style registry peer's network: taken", HUB,
     {**SELF, NEW: [net("10.0.0.3/32")]}, set(), set(),
     ((PeerConfig(NEW, allowed_ips=(net("10.0.0.3/32"),)),), (), (), {NEW}, 0)),
    ("equal to the registry peer's network: refused", HUB,
     {**SELF, NEW: [net("10.0.0.0/24")]}, set(), set(), ((), (), (), set(), 1)),
])
def test_plan(intent, device, listed, managed, exclude, want):
    got = plan(device, listed, frozenset(managed), registry=REG, exclude=frozenset(exclude))
    add, update, remove, after, refused = want
    assert (got.add, got.update, got.remove, got.managed, len(got.refused)) == (
        add, update, remove, frozenset(after), refused), intent


def test_an_overlap_names_both_peers_and_networks():
    [overlap] = plan(DEVICE, {**SELF, NEW: [net("10.0.0.9/32")]}, frozenset(),
                     registry=REG).refused
    assert overlap == Overlap(NEW, net("10.0.0.9/32"), USER, net("10.0.0.9/32"))
    assert str(overlap) == (f"mesh: peer {NEW}: allowed IP 10.0.0.9/32 overlaps 10.0.0.9/32 of "
                            f"peer {USER}, which the mesh did not add; peer not applied")


def test_an_unreadable_state_file_counts_nothing_as_managed(tmp_path, caplog):
    state_file("wg0", tmp_path).write_text("{not json")
    assert read_managed("wg0", tmp_path) == frozenset()
    assert "no peer counts as managed" in caplog.text


# -- the agent with a mesh, on a real device -------------------------------------------------


def listing(pair: Pair, *extra: tuple[Key, str]) -> tuple[PeerRecord, ...]:
    """The registry's records: a, b, the registry's peer and `extra` (key, allowed IP)."""
    own = [(pair.a.public, "10.77.0.1/32"), (pair.b.public, "10.77.0.2/32"),
           (pair.registry, "10.77.0.200/32")]
    return tuple(PeerRecord(key, (net(allowed),), None, None, None, 0)
                 for key, allowed in own + list(extra))


def dump(pair: Pair) -> dict[str, tuple[str, ...]]:
    """`wg show IF dump` per peer: its configuration (preshared key, endpoint, allowed IPs
    as a sorted list, keepalive); counters and handshake times left out."""
    return {row[0]: (row[1], row[2], ",".join(sorted(row[3].split(","))), row[7])
            for row in pair.a.wg_show_dump()[1:]}


def with_psk(pair: Pair, *keys: Key) -> None:
    psk = pair.tmp / "psk"
    psk.write_text(generate_keypair()[0].base64())
    psk.chmod(0o600)
    for key in keys:
        pair.a.wg_set("peer", key.base64(), "preshared-key", str(psk))


def mesh_agent(pair: Pair, registry: FakeRegistry, io: FakeIo,
               exclude: frozenset[Key] = frozenset()) -> Agent:
    return agent_for(pair, registry, io,
                     mesh=Mesh(pair.a.ifname, pair.tmp, pair.registry, exclude))


def managed(pair: Pair) -> set[str]:
    return set(json.loads(state_file(pair.a.ifname, pair.tmp).read_text())["managed"])


N1, N2, OVER = (generate_keypair()[1] for _ in range(3))


async def test_mesh_adds_updates_and_removes_only_its_own_peers(pair, registry, io, caplog):
    with_psk(pair, pair.b.public, pair.stranger, pair.registry)
    before = dump(pair)
    async with Running(mesh_agent(pair, registry, io)) as run:
        # Before the registry's first snapshot, nothing happens.
        assert await run.holds(lambda: dump(pair).keys() == before.keys(), duration=0.3)
        registry.publish(*listing(pair, (N1, "10.77.0.11/32"), (N2, "10.77.0.12/32"),
                                  (OVER, "10.77.0.3/32")))  # the stranger's address
        # The state file is written before the device changes and again after: poll both.
        rows = await run.until(lambda: N1.base64() in dump(pair) and N2.base64() in dump(pair)
                               and managed(pair) == {N1.base64(), N2.base64()} and dump(pair),
                               what="the mesh to add N1 and N2")
        # Public key and allowed IPs only: no preshared key, no endpoint, no keepalive.
        assert rows[N1.base64()] == ("(none)", "(none)", "10.77.0.11/32", "off")
        assert OVER.base64() not in rows
        for key in (pair.stranger, pair.registry):  # not touched at all
            assert rows[key.base64()] == before[key.base64()]
        b = rows[pair.b.public.base64()]  # the agent may steer b's endpoint; nothing else
        assert (b[0], b[2]) == (before[pair.b.public.base64()][0], "10.77.0.2/32")
        [refused] = [r for r in caplog.records if getattr(r, "event", None) == "mesh_refused"]
        assert "overlaps 10.77.0.3/32" in refused.getMessage()

        # The registry changes N2's networks, drops N1 and b (b is the user's: it stays).
        registry.change(PeerRecord(N2, (net("10.77.0.12/32"), net("10.77.1.0/24")), None,
                                   None, None, 0))
        registry.revision += 1
        registry.push(RemovedEvent(registry.revision, N1))
        registry.revision += 1
        registry.push(RemovedEvent(registry.revision, pair.b.public))
        rows = await run.until(
            lambda: N1.base64() not in dump(pair)
            and dump(pair)[N2.base64()][2] == "10.77.0.12/32,10.77.1.0/24"
            and managed(pair) == {N2.base64()} and dump(pair),
            what="N1 removed and N2's allowed IPs updated")
        assert pair.b.public.base64() in rows
        assert len(events(caplog, "mesh_refused")) == 1  # once, however many passes
        for key in (pair.stranger, pair.registry):
            assert rows[key.base64()] == before[key.base64()]


async def test_a_restart_adds_removes_and_changes_nothing(pair, registry, io, caplog):
    records = listing(pair, (N1, "10.77.0.11/32"), (N2, "10.77.0.12/32"))
    async with Running(mesh_agent(pair, registry, io)) as run:
        registry.publish(*records)
        await run.until(lambda: N2.base64() in dump(pair), what="the mesh to add N2")
    before = dump(pair)
    caplog.clear()
    again = FakeRegistry()
    async with Running(mesh_agent(pair, again, io)) as run:
        again.publish(*records)
        await run.until(lambda: again.delivered, what="the snapshot to arrive")
        assert await run.holds(lambda: dump(pair) == before, duration=0.5)
    assert not [r for r in caplog.records if getattr(r, "event", "").startswith("mesh_")]
    assert managed(pair) == {N1.base64(), N2.base64()}

    # Dropped while no agent ran: removed by the next one, which remembers it added it.
    later = FakeRegistry()
    async with Running(mesh_agent(pair, later, io)) as run:
        later.publish(*records[:-1])
        await run.until(lambda: N2.base64() not in dump(pair), what="N2 removed")
        assert N1.base64() in dump(pair)


async def test_an_excluded_peer_is_not_added_and_a_user_peers_key_is_never_managed(
        pair, registry, io):
    async with Running(mesh_agent(pair, registry, io, exclude=frozenset({N2}))) as run:
        registry.publish(*listing(pair, (N1, "10.77.0.11/32"), (N2, "10.77.0.12/32"),
                                  (pair.stranger, "10.77.0.3/32")))
        await run.until(lambda: N1.base64() in dump(pair) and managed(pair) == {N1.base64()},
                        what="the mesh to add N1")
        assert await run.holds(lambda: N2.base64() not in dump(pair), duration=0.3)


async def test_an_unwritable_state_directory_changes_nothing(pair, registry, io, caplog):
    blocked = pair.tmp / "blocked"
    blocked.write_text("a file where the directory should be")
    agent = agent_for(pair, registry, io, mesh=Mesh(pair.a.ifname, blocked / "d", pair.registry))
    before = dump(pair)
    async with Running(agent) as run:
        registry.publish(*listing(pair, (N1, "10.77.0.11/32")))
        await run.until(lambda: "mesh: cannot write" in caplog.text, what="the warning")
        assert dump(pair).keys() == before.keys()



async def test_the_report_waits_until_the_mesh_put_the_peers_on_the_device(pair, io):
    """Peers take our report as "follows punch events for me", which needs them on our
    device: reported earlier, a peer's initiation beat our opener through a collision NAT."""
    at_report: list[bool] = []

    class Recording(FakeRegistry):
        async def report_self(self, report):
            at_report.append(N1.base64() in dump(pair))
            await super().report_self(report)

    registry = Recording()
    async with Running(mesh_agent(pair, registry, io)) as run:
        registry.publish(*listing(pair, (N1, "10.77.0.11/32")))
        await run.until(lambda: at_report, what="the report")
    assert at_report[0]


async def test_once_applies_the_mesh_too(pair, registry, io):
    """`wgpunch node --once --mesh`, as cron runs it: one snapshot, the mesh applied."""
    registry.snapshot_of(*listing(pair, (N1, "10.77.0.11/32")))
    assert await mesh_agent(pair, registry, io).run_once() == 0
    assert dump(pair)[N1.base64()] == ("(none)", "(none)", "10.77.0.11/32", "off")
    assert managed(pair) == {N1.base64()}
