"""The device layer against real wireguard-go processes in throwaway network namespaces
(see wgpair.py)."""

import asyncio
import ipaddress
import shutil
import time

import pytest

from wgpair import PORT, Side, wg_pair
from wgpunch.errors import ChangeRefused, DeviceError
from wgpunch.keys import generate_keypair, generate_private_key
from wgpunch.wg import open_device
from wgpunch.wg.model import Endpoint, PeerConfig, parse_allowed_ip

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="wireguard-go not installed"),
]

@pytest.fixture
def pair(tmp_path):
    with wg_pair(tmp_path) as sides:
        yield sides

def dump_as_snapshot_fields(row: list[str]) -> tuple:
    """A peer line of `wg show dump`: key, psk, endpoint, allowed, handshake, rx, tx, ka."""
    key, psk, endpoint, allowed, handshake, rx, tx, keepalive = row
    return (key, psk != "(none)", None if endpoint == "(none)" else endpoint,
            sorted(allowed.split(",")) if allowed != "(none)" else [],
            int(handshake), int(rx), int(tx), 0 if keepalive == "off" else int(keepalive))

def snapshot_fields(peer) -> tuple:
    return (peer.public_key.base64(), peer.has_preshared_key,
            None if peer.endpoint is None else str(peer.endpoint),
            sorted(str(n) for n in peer.allowed_ips),
            0 if peer.latest_handshake is None else int(peer.latest_handshake),
            peer.rx_bytes, peer.tx_bytes, peer.persistent_keepalive)

async def assert_matches_wg_show(side: Side) -> None:
    state = await side.device.state()
    rows = side.wg_show_dump()
    device_row, peer_rows = rows[0], rows[1:]
    assert device_row[1] == state.public_key.base64()
    assert int(device_row[2]) == state.listen_port
    assert (0 if device_row[3] == "off" else int(device_row[3], 0)) == state.fwmark
    assert sorted(dump_as_snapshot_fields(r) for r in peer_rows) == sorted(
        snapshot_fields(p) for p in state.peers)

async def test_snapshot_matches_wg_show_dump(pair):
    a, _ = pair
    _, extra = generate_keypair()
    psk = generate_private_key()
    a.ns.run(["sh", "-c", f"umask 077; echo {psk.base64()} > /run/{a.ifname}.psk"])
    try:
        a.wg_set("peer", extra.base64(), "preshared-key", f"/run/{a.ifname}.psk",
             "endpoint", "[2001:db8::7]:4500", "allowed-ips", "10.77.1.0/24,fd00:77::/64",
             "persistent-keepalive", "7")
    finally:
        a.ns.run(["rm", "-f", f"/run/{a.ifname}.psk"])
    await assert_matches_wg_show(a)
    state, secret_keys = await a.device._read()
    assert secret_keys == {extra: psk}
    assert state.peer(extra).has_preshared_key

async def test_each_change_shows_in_wg_show(pair):
    a, b = pair
    dev = a.device
    await dev.set_endpoint(b.public, Endpoint.parse("192.0.2.200:1234"))
    await dev.set_keepalive(b.public, 11)
    row = {r[0]: r for r in a.wg_show_dump()[1:]}[b.public.base64()]
    assert (row[2], row[7]) == ("192.0.2.200:1234", "11")

    _, new = generate_keypair()
    await dev.set_peer(PeerConfig(new, allowed_ips=(parse_allowed_ip("10.77.2.0/24"),),
                                  endpoint=Endpoint.parse("[2001:db8::9]:9")))
    row = {r[0]: r for r in a.wg_show_dump()[1:]}[new.base64()]
    assert (row[2], row[3]) == ("[2001:db8::9]:9", "10.77.2.0/24")

    await dev.set_peer(PeerConfig(new, replace_allowed_ips=True,
                                  allowed_ips=(parse_allowed_ip("10.77.3.1/32"),)))
    row = {r[0]: r for r in a.wg_show_dump()[1:]}[new.base64()]
    assert row[3] == "10.77.3.1/32"

    await dev.remove_peer(new)
    assert new.base64() not in {r[0] for r in a.wg_show_dump()[1:]}
    await assert_matches_wg_show(a)

async def handshake_from_a(a: Side, b: Side) -> float:
    """handshake-now on A toward B; returns seconds until A's device shows the handshake.

    Only one side acts: when both sides' initiations cross in flight, each side's incoming
    initiation replaces its own pending one, neither response matches, and WireGuard only
    recovers on its 5 s retry (measured here: 5.07 s).
    """
    start = time.monotonic()
    await a.device.handshake_now(b.public, Endpoint.parse(f"{b.veth_ip}:{PORT}"))
    deadline = start + 1.0
    while (await a.device.state()).peer(b.public).latest_handshake is None:
        assert time.monotonic() < deadline, "no handshake within 1 s of handshake-now"
        await asyncio.sleep(0.01)  # poll interval, bounded by the deadline above
    return time.monotonic() - start

async def test_handshake_now_handshakes_within_a_second(pair):
    a, b = pair
    # What handshake-now is for: a peer that has been trying with keepalive and no endpoint
    # is inside WireGuard's 5 s REKEY_TIMEOUT, so a plain endpoint change would wait.
    await handshake_from_a(a, b)
    a.ns.run(["ping", "-c", "1", "-W", "2", b.tunnel_ip])
    b.ns.run(["ping", "-c", "1", "-W", "2", a.tunnel_ip])
    peer = (await a.device.state()).peer(b.public)
    assert str(peer.endpoint) == f"{b.veth_ip}:{PORT}" and peer.persistent_keepalive == 25

async def test_handshake_now_refuses_a_live_session(pair):
    a, b = pair
    await handshake_from_a(a, b)
    before = a.wg_show_dump()
    with pytest.raises(ChangeRefused, match="live session"):
        await a.device.handshake_now(b.public, Endpoint.parse("192.0.2.99:1"))
    assert a.wg_show_dump()[1][:4] == before[1][:4]

async def test_refused_changes_leave_the_device_as_it_was(pair):
    a, b = pair
    before = a.wg_show_dump()
    _, stranger = generate_keypair()
    with pytest.raises(ChangeRefused, match="no peer"):
        await a.device.set_endpoint(stranger, Endpoint.parse("192.0.2.9:9"))
    with pytest.raises(ChangeRefused, match="twice"):
        await a.device.configure([PeerConfig(b.public, persistent_keepalive=1),
                                  PeerConfig(b.public, persistent_keepalive=2)])
    with pytest.raises(ChangeRefused, match="own public key"):
        await a.device.set_peer(PeerConfig(a.public, allowed_ips=()))
    assert a.wg_show_dump() == before

async def test_a_change_the_device_rejects_half_way_is_rolled_back(pair):
    """wireguard-go applies UAPI lines as it reads them: here it has changed b's allowed IPs
    and created a new peer when it rejects the new peer's endpoint (an IPv6 zone naming no
    interface). configure() puts both back."""
    a, b = pair
    before = a.wg_show_dump()
    _, new = generate_keypair()
    bogus = Endpoint(ipaddress.IPv6Address("fe80::1%nosuchinterface"), 1)
    with pytest.raises(DeviceError, match=f"uapi: {a.ifname}: set failed: errno 22"):
        await a.device.configure([
            PeerConfig(b.public, replace_allowed_ips=True,
                       allowed_ips=(parse_allowed_ip("10.77.9.0/24"),)),
            PeerConfig(new, endpoint=bogus, allowed_ips=()),
        ])
    assert a.wg_show_dump() == before

async def test_open_device_picks_uapi_for_wireguard_go(pair):
    a, _ = pair
    device = open_device(a.ifname)
    assert device.backend == "uapi"
    assert (await device.state()).public_key == a.public

async def test_private_key_in_no_snapshot(pair):
    a, _ = pair
    state = await a.device.state()
    assert a.private.base64() not in repr(state) and a.private.hex() not in repr(state)

async def test_private_key_only_when_asked_and_never_shown(pair):
    a, _ = pair
    key = await a.device.private_key()
    assert key == a.private
    assert a.private.base64() not in repr(key) and a.private.base64() not in str(key)
    a.wg_set("private-key", "/dev/null")  # wg(8): an empty file removes the key
    assert await a.device.private_key() is None

async def test_a_shared_read_never_outlives_a_change_through_the_device(pair):
    a, b = pair
    await a.device.state()
    a.wg_set("peer", b.public.base64(), "endpoint", f"{b.veth_ip}:{PORT}")  # not through it
    shared = (await a.device.state(fresh_s=60)).peer(b.public)
    assert shared.endpoint is None, "within fresh_s the last read is shared, as it was"
    await a.device.set_endpoint(b.public, Endpoint.parse(f"{b.veth_ip}:4444"))
    assert str((await a.device.state(fresh_s=60)).peer(b.public).endpoint) == (
        f"{b.veth_ip}:4444"), "a change through the device makes the next read a new one"
