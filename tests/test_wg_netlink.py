"""The kernel WireGuard backend: its codec against pyroute2's own structures, then a real device.

Unit tests build messages the way the kernel's answer reaches us: attribute lists encoded by
pyroute2's `wgmsg` and decoded back by it, so the input has exactly the shape pyroute2 gives
(base64 bytes for keys, dicts for sockaddrs and timespecs, nested nla objects). Changes go the
other way and are decoded back, to check what the kernel would read.

The lab test needs root and the kernel's WireGuard module; without them it is skipped, saying
which was missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import ipaddress
import logging
import os
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError
from pyroute2.netlink.generic.wireguard import wgmsg

from wgpunch.errors import ChangeRefused, DeviceError, DeviceNotFound, MalformedReply
from wgpunch.keys import Key, generate_keypair
from wgpunch.lab.netns import Namespace, run
from wgpunch.wg.model import Endpoint, PeerConfig, parse_allowed_ip
from wgpunch.wg.netlink import (
    NLM_F_DUMP_INTR,
    WGPEER_F_REMOVE_ME,
    WGPEER_F_REPLACE_ALLOWEDIPS,
    WGPEER_F_UPDATE_ONLY,
    NetlinkDevice,
    device_from_nlmsgs,
    genl_family_exists,
    kernel_wireguard_available,
    list_kernel_devices,
    set_message_from_changes,
)

DEV_KEY = Key(bytes([1]) * 32)
PEER_A = Key(bytes([2]) * 32)
PEER_B = Key(bytes([3]) * 32)
PEER_C = Key(bytes([4]) * 32)
PSK = Key(bytes([9]) * 32, secret=True)
ZERO = Key(bytes(32), secret=True)
NLM_F_MULTI = 0x2
WG_FAMILY_ID = 0x1D  # any id: the fake socket only echoes it


def nets(*texts: str) -> tuple[Any, ...]:
    return tuple(parse_allowed_ip(t) for t in texts)


def allowed_attr(text: str) -> dict[str, Any]:
    net = ipaddress.ip_network(text)
    family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    return {"attrs": [["WGALLOWEDIP_A_FAMILY", family],
                      ["WGALLOWEDIP_A_IPADDR", net.network_address.packed],
                      ["WGALLOWEDIP_A_CIDR_MASK", net.prefixlen]]}


def kernel_peer(key: Key, *, psk: Key = ZERO, endpoint: tuple[str, int] | None = None,
                handshake: tuple[int, int] = (0, 0), rx: int = 0, tx: int = 0,
                keepalive: int = 0, allowed: tuple[str, ...] = ()) -> dict[str, Any]:
    """A peer as the kernel's get_peer() sends it: every field, endpoint only when set."""
    attrs: list[list[Any]] = [["WGPEER_A_PUBLIC_KEY", key.base64()],
                              ["WGPEER_A_PRESHARED_KEY", psk.base64()]]
    if endpoint is not None:
        attrs.append(["WGPEER_A_ENDPOINT", {"addr": endpoint[0], "port": endpoint[1]}])
    attrs += [["WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": handshake[0], "tv_nsec": handshake[1]}],
              ["WGPEER_A_RX_BYTES", rx], ["WGPEER_A_TX_BYTES", tx],
              ["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", keepalive],
              ["WGPEER_A_PROTOCOL_VERSION", 1],
              ["WGPEER_A_ALLOWEDIPS", [allowed_attr(a) for a in allowed]]]
    return {"attrs": attrs}


def continued_peer(key: Key, allowed: tuple[str, ...]) -> dict[str, Any]:
    """A peer whose allowed IPs ran over into the next message: the kernel repeats only the key."""
    return {"attrs": [["WGPEER_A_PUBLIC_KEY", key.base64()],
                      ["WGPEER_A_ALLOWEDIPS", [allowed_attr(a) for a in allowed]]]}


def device_attrs(*, public: Key | None = DEV_KEY, port: int = 51820, fwmark: int = 0
                 ) -> list[list[Any]]:
    attrs: list[list[Any]] = [["WGDEVICE_A_LISTEN_PORT", port], ["WGDEVICE_A_FWMARK", fwmark],
                              ["WGDEVICE_A_IFINDEX", 7], ["WGDEVICE_A_IFNAME", "wg0"]]
    if public is not None:
        attrs += [["WGDEVICE_A_PRIVATE_KEY", Key(bytes([8]) * 32).base64()],
                  ["WGDEVICE_A_PUBLIC_KEY", public.base64()]]
    return attrs


def through_pyroute2(msg: wgmsg) -> wgmsg:
    msg.encode()
    decoded = wgmsg(msg.data)
    decoded.decode()
    return decoded


def kernel_dump(*messages: tuple[list[list[Any]], list[dict[str, Any]]],
                flags: int = NLM_F_MULTI) -> list[wgmsg]:
    """Each (device attrs, peers) pair as one dump message, encoded and decoded by pyroute2."""
    out = []
    for attrs, peers in messages:
        msg = wgmsg()
        msg["cmd"], msg["version"] = 0, 1
        msg["header"]["type"], msg["header"]["flags"] = WG_FAMILY_ID, flags
        msg["attrs"] = [*attrs, ["WGDEVICE_A_PEERS", peers]]
        out.append(through_pyroute2(msg))
    return out


# -- dump -> DeviceState --------------------------------------------------------------------


def test_dump_decodes_to_snapshot_and_secrets():
    dump = kernel_dump((device_attrs(fwmark=0x1337), [
        kernel_peer(PEER_A, psk=PSK, endpoint=("192.0.2.1", 51820), handshake=(1700000000, 5),
                    rx=10, tx=20, keepalive=25, allowed=("10.0.0.2/32", "fd00::2/128")),
        kernel_peer(PEER_B, endpoint=("2001:db8::1", 443)),
    ]))
    state, psks = device_from_nlmsgs(dump, "wg0")
    assert (state.name, state.public_key, state.listen_port, state.fwmark) == (
        "wg0", DEV_KEY, 51820, 0x1337)
    a, b = state.peers
    assert a.public_key == PEER_A and a.endpoint == Endpoint.parse("192.0.2.1:51820")
    assert a.allowed_ips == nets("10.0.0.2/32", "fd00::2/128")
    assert a.latest_handshake == 1700000000 + 5e-9
    assert (a.rx_bytes, a.tx_bytes, a.persistent_keepalive, a.has_preshared_key) == (
        10, 20, 25, True)
    assert b.endpoint == Endpoint.parse("[2001:db8::1]:443")
    assert (b.allowed_ips, b.latest_handshake, b.has_preshared_key) == ((), None, False)
    assert psks == {PEER_A: PSK}  # a zero key is "no preshared key", not a secret
    assert psks[PEER_A].secret and "CQkJ" not in repr(psks)


@pytest.mark.parametrize(("sec", "nsec", "want"), [
    (0, 0, None),                        # never: both halves zero
    (1700000000, 0, 1700000000.0),       # exactly on a second is a handshake, not "never"
    (1700000000, 500_000_000, 1700000000.5),
    (0, 1, 0.0),                         # absurd but not zero: still not "never"
    (1799999999, 999_999_999, 1799999999.999999),  # rounds down, never to the next second
])
def test_handshake_never_only_when_both_halves_are_zero(sec, nsec, want):
    dump = kernel_dump((device_attrs(), [kernel_peer(PEER_A, handshake=(sec, nsec))]))
    assert device_from_nlmsgs(dump, "wg0")[0].peers[0].latest_handshake == want


def test_peers_split_over_two_messages_merge_into_one_device():
    first = (device_attrs(port=4242), [
        kernel_peer(PEER_A, allowed=("10.0.0.1/32",)),
        kernel_peer(PEER_B, keepalive=15, rx=7, allowed=("10.0.1.0/24", "10.0.2.0/24")),
    ])
    # Later messages carry no device attributes, and B's remaining allowed IPs lead them.
    second = ([["WGDEVICE_A_IFINDEX", 7], ["WGDEVICE_A_IFNAME", "wg0"]], [
        continued_peer(PEER_B, ("10.0.3.0/24", "fd00:3::/64")),
        kernel_peer(PEER_C, endpoint=("198.51.100.7", 9)),
    ])
    state, _ = device_from_nlmsgs(kernel_dump(first, second), "wg0")
    assert [p.public_key for p in state.peers] == [PEER_A, PEER_B, PEER_C]
    assert state.listen_port == 4242 and state.public_key == DEV_KEY
    b = state.peers[1]
    assert b.allowed_ips == nets("10.0.1.0/24", "10.0.2.0/24", "10.0.3.0/24", "fd00:3::/64")
    assert (b.persistent_keepalive, b.rx_bytes) == (15, 7)  # kept from B's first part


def test_device_without_private_key_has_no_public_key():
    state, _ = device_from_nlmsgs(kernel_dump((device_attrs(public=None, port=0), [])), "wg0")
    assert (state.public_key, state.listen_port, state.peers) == (None, 0, ())


@pytest.mark.parametrize(("msgs", "message"), [
    ([], "netlink: wg0: the device dump is empty"),
    (kernel_dump((device_attrs(), [{"attrs": [["WGPEER_A_RX_BYTES", 1]]}])),
     "netlink: wg0: the dump has a peer without a key"),
])
def test_malformed_dump(msgs, message):
    with pytest.raises(MalformedReply) as info:
        device_from_nlmsgs(msgs, "wg0")
    assert str(info.value) == message


# -- changes -> one SET message -------------------------------------------------------------


def sent_peers(changes: list[PeerConfig]) -> list[dict[str, Any]]:
    """The peers of the SET message as the kernel would parse them: name -> value per peer."""
    msg = through_pyroute2(set_message_from_changes("wg0", changes))
    assert (msg["cmd"], msg.get_attr("WGDEVICE_A_IFNAME")) == (1, "wg0")
    return [dict(p["attrs"]) for p in msg.get_attr("WGDEVICE_A_PEERS")]


def test_peer_flags_are_the_kernel_values():
    # include/uapi/linux/wireguard.h; pyroute2 0.7.x ships 0, 1, 2, so they are not taken from it
    assert (WGPEER_F_REMOVE_ME, WGPEER_F_REPLACE_ALLOWEDIPS, WGPEER_F_UPDATE_ONLY) == (1, 2, 4)


def test_remove_sends_only_the_key_and_the_remove_flag():
    (peer,) = sent_peers([PeerConfig(PEER_A, remove=True)])
    assert peer == {"WGPEER_A_PUBLIC_KEY": PEER_A.base64().encode(),
                    "WGPEER_A_FLAGS": WGPEER_F_REMOVE_ME}


def test_update_only_endpoint_v4_sends_nothing_else():
    (peer,) = sent_peers([PeerConfig(PEER_A, update_only=True,
                                     endpoint=Endpoint.parse("192.0.2.1:51820"))])
    assert set(peer) == {"WGPEER_A_PUBLIC_KEY", "WGPEER_A_FLAGS", "WGPEER_A_ENDPOINT"}
    assert peer["WGPEER_A_FLAGS"] == WGPEER_F_UPDATE_ONLY
    endpoint = peer["WGPEER_A_ENDPOINT"]
    assert (endpoint["family"], endpoint["addr"], endpoint["port"]) == (
        socket.AF_INET, "192.0.2.1", 51820)


def test_full_peer_v6_endpoint_keepalive_zero_psk_and_replaced_allowed_ips():
    (peer,) = sent_peers([PeerConfig(
        PEER_B, endpoint=Endpoint.parse("[2001:db8::1]:443"), persistent_keepalive=0,
        preshared_key=PSK, replace_allowed_ips=True, allowed_ips=nets("10.0.0.0/8", "fd00::/8"),
    )])
    assert peer["WGPEER_A_FLAGS"] == WGPEER_F_REPLACE_ALLOWEDIPS
    endpoint = peer["WGPEER_A_ENDPOINT"]
    assert (endpoint["family"], endpoint["addr"], endpoint["port"], endpoint["scope_id"]) == (
        socket.AF_INET6, "2001:db8::1", 443, 0)
    assert peer["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL"] == 0  # sent: 0 turns keepalive off
    assert peer["WGPEER_A_PRESHARED_KEY"] == PSK.base64().encode()
    assert [a["addr"] for a in peer["WGPEER_A_ALLOWEDIPS"]] == ["10.0.0.0/8", "fd00::/8"]


def test_zero_psk_is_sent_to_clear_and_unset_fields_are_not_sent():
    (clear, untouched) = sent_peers([PeerConfig(PEER_A, preshared_key=ZERO), PeerConfig(PEER_B)])
    assert clear["WGPEER_A_PRESHARED_KEY"] == ZERO.base64().encode()
    assert "WGPEER_A_FLAGS" not in clear
    assert untouched == {"WGPEER_A_PUBLIC_KEY": PEER_B.base64().encode()}


def test_replace_with_no_allowed_ips_sends_the_flag_alone():
    (peer,) = sent_peers([PeerConfig(PEER_A, replace_allowed_ips=True, allowed_ips=())])
    assert peer["WGPEER_A_FLAGS"] == WGPEER_F_REPLACE_ALLOWEDIPS
    assert "WGPEER_A_ALLOWEDIPS" not in peer


def test_remove_and_readd_of_one_key_stay_in_one_message_in_order():
    remove, readd = sent_peers([
        PeerConfig(PEER_A, remove=True),
        PeerConfig(PEER_A, endpoint=Endpoint.parse("192.0.2.9:1"), replace_allowed_ips=True,
                   allowed_ips=nets("10.0.0.2/32")),
    ])
    assert remove["WGPEER_A_FLAGS"] == WGPEER_F_REMOVE_ME
    assert readd["WGPEER_A_PUBLIC_KEY"] == remove["WGPEER_A_PUBLIC_KEY"]
    assert readd["WGPEER_A_FLAGS"] == WGPEER_F_REPLACE_ALLOWEDIPS


def test_endpoint_with_ipv6_zone_is_refused_before_sending():
    zoned = Endpoint(ipaddress.ip_address("fe80::1%eth0"), 51820)
    with pytest.raises(ChangeRefused, match="has an IPv6 zone"):
        set_message_from_changes("wg0", [PeerConfig(PEER_A, endpoint=zoned)])


# -- NetlinkDevice over a fake pyroute2 socket ----------------------------------------------


class FakeSocket:
    """Stands in for pyroute2's WireGuard socket: canned dumps, records what it is sent."""

    prid = WG_FAMILY_ID

    def __init__(self, dumps: list[list[wgmsg]], set_errors: list[int] | None = None,
                 get_error: int | None = None) -> None:
        self.dumps = dumps
        self.set_errors = set_errors or []
        self.get_error = get_error
        self.sent: list[tuple[wgmsg, int, int]] = []
        self.opened = self.closed = 0

    def open(self) -> FakeSocket:
        self.opened += 1
        return self

    def info(self, interface: str) -> list[wgmsg]:
        if self.get_error is not None:
            raise NetlinkError(self.get_error)
        return self.dumps.pop(0) if len(self.dumps) > 1 else self.dumps[0]

    def nlm_request(self, msg: wgmsg, msg_type: int, msg_flags: int) -> list[wgmsg]:
        self.sent.append((through_pyroute2(msg), msg_type, msg_flags))
        if self.set_errors:
            raise NetlinkError(self.set_errors.pop(0))
        return []

    def close(self) -> None:
        self.closed += 1


ONE_PEER = kernel_dump((device_attrs(), [
    kernel_peer(PEER_A, psk=PSK, endpoint=("192.0.2.1", 1), keepalive=25,
                allowed=("10.0.0.2/32",)),
]))


async def test_state_opens_and_closes_one_socket():
    fake = FakeSocket([ONE_PEER])
    state = await NetlinkDevice("wg0", open_socket=fake.open).state()
    assert state.peers[0].public_key == PEER_A
    assert (fake.opened, fake.closed) == (1, 1)


async def test_configure_sends_every_change_in_one_acked_request():
    fake = FakeSocket([ONE_PEER])
    await NetlinkDevice("wg0", open_socket=fake.open).configure([
        PeerConfig(PEER_A, update_only=True, persistent_keepalive=5),
        PeerConfig(PEER_B, allowed_ips=nets("10.0.0.3/32")),
    ])
    ((msg, msg_type, msg_flags),) = fake.sent
    assert (msg_type, msg_flags) == (WG_FAMILY_ID, NLM_F_REQUEST | NLM_F_ACK)
    assert len(msg.get_attr("WGDEVICE_A_PEERS")) == 2
    assert fake.opened == fake.closed


async def test_handshake_now_is_one_set_message():
    fake = FakeSocket([ONE_PEER])
    device = NetlinkDevice("wg0", open_socket=fake.open)
    await device.handshake_now(PEER_A, Endpoint.parse("192.0.2.2:51820"), now=time.time())
    ((msg, _, _),) = fake.sent
    remove, readd = (dict(p["attrs"]) for p in msg.get_attr("WGDEVICE_A_PEERS"))
    assert remove["WGPEER_A_FLAGS"] == WGPEER_F_REMOVE_ME
    assert readd["WGPEER_A_FLAGS"] == WGPEER_F_REPLACE_ALLOWEDIPS
    assert readd["WGPEER_A_PRESHARED_KEY"] == PSK.base64().encode()  # carried over, not lost
    assert readd["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL"] == 25
    assert readd["WGPEER_A_ENDPOINT"]["addr"] == "192.0.2.2"
    assert [a["addr"] for a in readd["WGPEER_A_ALLOWEDIPS"]] == ["10.0.0.2/32"]


async def test_interrupted_dump_is_read_again():
    torn = kernel_dump((device_attrs(), []), flags=NLM_F_MULTI | NLM_F_DUMP_INTR)
    fake = FakeSocket([torn, ONE_PEER])
    state = await NetlinkDevice("wg0", open_socket=fake.open).state()
    assert len(state.peers) == 1


async def test_dump_interrupted_as_pyroute2_07_reports_it_is_read_again():
    fake = FakeSocket([ONE_PEER])
    real_info = fake.info
    calls = []

    def info(interface: str) -> list[wgmsg]:
        calls.append(interface)
        if len(calls) == 1:
            raise NetlinkDumpInterrupted()  # 0.7 raises this; 0.9 hands us the flag
        return real_info(interface)

    fake.info = info  # type: ignore[method-assign]
    state = await NetlinkDevice("wg0", open_socket=fake.open).state()
    assert len(state.peers) == 1 and len(calls) == 2


async def test_dump_interrupted_every_time_is_an_error():
    torn = kernel_dump((device_attrs(), []), flags=NLM_F_MULTI | NLM_F_DUMP_INTR)
    with pytest.raises(DeviceError) as info:
        await NetlinkDevice("wg0", open_socket=FakeSocket([torn]).open).state()
    assert info.value.errno == errno.EINTR


@pytest.mark.parametrize(("code", "kind", "message"), [
    (errno.ENODEV, DeviceNotFound, "netlink: no WireGuard device 'wg0'"),
    (errno.ENOENT, DeviceNotFound, "netlink: no WireGuard device 'wg0'"),
    # what the kernel answers for a tun device run by wireguard-go: someone else's device
    (errno.EOPNOTSUPP, DeviceNotFound, "netlink: 'wg0' is not a kernel WireGuard device"),
    (errno.EPERM, DeviceError, "netlink: wg0: get: Operation not permitted"),
])
async def test_read_errors_are_translated(code, kind, message):
    fake = FakeSocket([ONE_PEER], get_error=code)
    with pytest.raises(kind) as info:
        await NetlinkDevice("wg0", open_socket=fake.open).state()
    assert type(info.value) is kind and str(info.value) == message
    assert fake.closed == 1


async def test_missing_family_means_no_kernel_module():
    def no_family() -> FakeSocket:
        raise NetlinkError(errno.ENOENT)  # what pyroute2's WireGuard() raises then

    with pytest.raises(DeviceNotFound) as info:
        await NetlinkDevice("wg0", open_socket=no_family).state()
    assert str(info.value) == ("netlink: no WireGuard device 'wg0': the kernel has no WireGuard "
                               "module (no 'wireguard' generic netlink family)")


async def test_refused_set_is_a_device_error_without_secrets(caplog):
    caplog.set_level(logging.DEBUG)
    fake = FakeSocket([ONE_PEER], set_errors=[errno.EINVAL])
    with pytest.raises(DeviceError) as info:
        await NetlinkDevice("wg0", open_socket=fake.open).configure(
            [PeerConfig(PEER_B, preshared_key=PSK)])
    assert str(info.value) == "netlink: wg0: set: Invalid argument"
    assert info.value.errno == errno.EINVAL
    assert PSK.base64() not in caplog.text and PSK.base64() not in str(info.value)
    assert logging.getLogger("pyroute2").getEffectiveLevel() >= logging.INFO


async def test_failed_opens_leave_no_file_descriptor_open():
    """A registry polls a missing kernel device every few ms: each failed open must clean up."""
    if await asyncio.to_thread(kernel_wireguard_available):  # pyroute2 sync: not on the loop
        pytest.skip("the kernel has WireGuard: opening the socket does not fail here")
    gc.disable()  # the leak was only reclaimed by the cycle collector
    try:
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(50):
            with pytest.raises(DeviceNotFound):
                await NetlinkDevice("wgpunchnosuch0").state()
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        gc.enable()


def test_genl_family_probe_against_the_running_kernel():
    assert genl_family_exists("nlctrl") is True  # the controller family always exists
    assert genl_family_exists("wgpunch-no-such-family") is False
    assert isinstance(kernel_wireguard_available(), bool)


# -- lab: a real kernel device in a throwaway namespace --------------------------------------


def _enter_namespace(name: str) -> None:
    # setns(CLONE_NEWNET) moves only the calling thread; this one exists for the test alone.
    from pyroute2.netns import setns

    setns(f"/run/netns/{name}", flags=0)


@contextlib.contextmanager
def netlink_inside(ns: Namespace) -> Iterator[None]:
    """Make asyncio.to_thread, and so NetlinkDevice's sockets, run inside `ns`."""
    executor = ThreadPoolExecutor(1, initializer=_enter_namespace, initargs=(ns.name,))
    asyncio.get_running_loop().set_default_executor(executor)
    try:
        yield
    finally:
        executor.shutdown(wait=True)


@dataclass
class KernelLab:
    ns: Namespace
    a: str
    b: str
    a_public: Key
    b_public: Key

    def wg(self, *args: str) -> str:
        return self.ns.run(["wg", *args]).stdout

    def dump(self, ifname: str) -> list[list[str]]:
        return [line.split("\t") for line in self.wg("show", ifname, "dump").splitlines()]

    def peer_row(self, ifname: str, key: Key) -> list[str] | None:
        return {r[0]: r for r in self.dump(ifname)[1:]}.get(key.base64())


@pytest.fixture
def kernel_lab(request: pytest.FixtureRequest, tmp_path: Path) -> KernelLab:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces and kernel WireGuard links")
    for tool in ("ip", "wg"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool!r} is not installed")
    tag = secrets.token_hex(3)
    ns = Namespace(f"wgpunch-nl-{tag}")
    request.addfinalizer(ns.delete)  # registered first: runs even if the setup below fails
    ns.add()
    a, b = f"wgpa{tag}", f"wgpb{tag}"
    made = run(["ip", "-n", ns.name, "link", "add", a, "type", "wireguard"], check=False)
    if made.returncode != 0:
        pytest.skip(f"the kernel has no WireGuard module: `ip link add {a} type wireguard` "
                    f"failed: {made.stderr.strip()}")
    if not kernel_wireguard_available():
        pytest.skip("the kernel has no 'wireguard' generic netlink family")
    run(["ip", "-n", ns.name, "link", "add", b, "type", "wireguard"])
    keys = {}
    for ifname, port in ((a, 51820), (b, 51821)):
        private, keys[ifname] = generate_keypair()
        key_file = tmp_path / f"{ifname}.key"
        key_file.write_text(private.base64())
        key_file.chmod(0o600)
        ns.run(["wg", "set", ifname, "private-key", str(key_file), "listen-port", str(port)])
        ns.run(["ip", "link", "set", ifname, "up"])
    return KernelLab(ns, a, b, keys[a], keys[b])


def dump_fields(row: list[str]) -> tuple[Any, ...]:
    """A peer line of `wg show dump` but the handshake: key, psk, endpoint, allowed, rx, tx, ka."""
    key, psk, endpoint, allowed, _handshake, rx, tx, keepalive = row
    return (key, None if psk == "(none)" else psk, None if endpoint == "(none)" else endpoint,
            [] if allowed == "(none)" else sorted(allowed.split(",")), int(rx), int(tx),
            0 if keepalive == "off" else int(keepalive))


def snapshot_fields(peer: Any, psks: dict[Key, Key]) -> tuple[Any, ...]:
    psk = psks.get(peer.public_key)
    return (peer.public_key.base64(), psk and psk.base64(),
            None if peer.endpoint is None else str(peer.endpoint),
            sorted(str(n) for n in peer.allowed_ips), peer.rx_bytes, peer.tx_bytes,
            peer.persistent_keepalive)


@pytest.mark.lab
async def test_kernel_device_matches_wg_show_and_applies_changes(
    kernel_lab: KernelLab, tmp_path: Path
):
    lab = kernel_lab
    psk = Key(secrets.token_bytes(32), secret=True)
    psk_file = tmp_path / "psk"
    psk_file.write_text(psk.base64())
    psk_file.chmod(0o600)
    # 1500 allowed IPs do not fit one dump message: the kernel splits this peer.
    many = ",".join(f"10.{i // 250}.{i % 250}.1/32" for i in range(1500))
    lab.wg("set", lab.a, "fwmark", "0x1337", "peer", lab.b_public.base64(),
           "preshared-key", str(psk_file), "endpoint", "127.0.0.1:51821",
           "persistent-keepalive", "0", "allowed-ips", f"fd00::2/128,{many}")
    other = generate_keypair()[1]
    lab.wg("set", lab.a, "peer", other.base64(), "endpoint", "[::1]:9",
           "allowed-ips", "10.99.0.0/16")
    device = NetlinkDevice(lab.a)
    with netlink_inside(lab.ns):
        assert await asyncio.to_thread(list_kernel_devices) == sorted([lab.a, lab.b])
        state, psks = await device._read()
        rows = lab.dump(lab.a)
        assert rows[0][1:3] == [lab.a_public.base64(), "51820"]
        assert int(rows[0][3], 0) == 0x1337  # `wg` prints "0x1337"; int(_, 0) reads any base
        assert (state.public_key, state.listen_port, state.fwmark) == (lab.a_public, 51820, 0x1337)
        assert sorted(dump_fields(r) for r in rows[1:]) == sorted(
            snapshot_fields(p, psks) for p in state.peers)
        assert len(state.peer(lab.b_public).allowed_ips) == 1501

        # Each change, as `wg` sees it afterwards.
        await device.set_endpoint(other, Endpoint.parse("[::1]:4242"))
        assert lab.peer_row(lab.a, other)[2] == "[::1]:4242"
        await device.set_keepalive(other, 7)
        assert lab.peer_row(lab.a, other)[7] == "7"
        await device.set_peer(PeerConfig(other, replace_allowed_ips=True,
                                         allowed_ips=nets("10.98.0.0/16", "fd98::/64")))
        assert sorted(lab.peer_row(lab.a, other)[3].split(",")) == ["10.98.0.0/16", "fd98::/64"]
        await device.set_peer(PeerConfig(other, preshared_key=psk))
        assert lab.peer_row(lab.a, other)[1] == psk.base64()
        await device.set_peer(PeerConfig(other, preshared_key=Key(bytes(32), secret=True)))
        assert lab.peer_row(lab.a, other)[1] == "(none)"
        await device.remove_peer(other)
        assert lab.peer_row(lab.a, other) is None
        stranger = generate_keypair()[1]
        await device.set_peer(PeerConfig(stranger, update_only=True, persistent_keepalive=3))
        assert lab.peer_row(lab.a, stranger) is None  # update-only never creates a peer


@pytest.mark.lab
async def test_kernel_handshake_now_does_not_wait_for_rekey_timeout(kernel_lab: KernelLab):
    lab = kernel_lab
    lab.wg("set", lab.b, "peer", lab.a_public.base64(), "allowed-ips", "10.7.0.1/32")
    # A has tried B at a dead port: its next attempt would wait out REKEY_TIMEOUT (5 s).
    lab.wg("set", lab.a, "peer", lab.b_public.base64(), "endpoint", "127.0.0.1:9",
           "persistent-keepalive", "25", "allowed-ips", "10.7.0.2/32")
    device = NetlinkDevice(lab.a)
    with netlink_inside(lab.ns):
        before = (await device.state()).peer(lab.b_public)
        started = time.monotonic()
        await device.handshake_now(lab.b_public, Endpoint.parse("127.0.0.1:51821"))
        # WireGuard REKEY_TIMEOUT is 5 s; a handshake well inside it proves the reset.
        deadline = started + 3.0
        while (peer := (await device.state()).peer(lab.b_public)).latest_handshake is None:
            assert time.monotonic() < deadline, "no handshake within 3 s of handshake-now"
            await asyncio.sleep(0.05)  # poll interval, bounded by the deadline above
    assert (peer.allowed_ips, peer.persistent_keepalive) == (before.allowed_ips, 25)
    assert lab.peer_row(lab.a, lab.b_public)[2] == "127.0.0.1:51821"


async def test_private_key_is_read_only_when_asked():
    fake = FakeSocket([ONE_PEER])
    device = NetlinkDevice("wg0", open_socket=fake.open)
    key = await device.private_key()
    assert key == Key(bytes([8]) * 32) and key.secret
    assert key.base64() not in repr(await device.state())  # the snapshot never carries it
    without = kernel_dump((device_attrs(public=None, port=0), []))
    assert await NetlinkDevice("wg0", open_socket=FakeSocket([without]).open).private_key() is None
