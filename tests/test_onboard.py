"""Onboarding (onboard/): `init registry` writes its files; `invite` and `revoke` change a real
wireguard-go device (tests/wgpair.py: side a is the registry's) and the registry's wg-quick
config together; every error leaves both exactly as they were.

"Unwritable" is made with `chattr +i` (root writes through file modes): an immutable
directory fails before the device is touched; an immutable config file fails after, so the
device change must be undone."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from wgpair import Side, unique_prefix, wg_pair
from wgpunch.cli import main
from wgpunch.errors import ConfigError, DeviceError
from wgpunch.keys import Key, generate_keypair, public_key
from wgpunch.onboard import members
from wgpunch.onboard.invite import invite, revoke
from wgpunch.onboard.wgquick import WgQuickConfig
from wgpunch.wg.uapi import UapiDevice

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="wireguard-go not installed"),
]

REGISTRY_CONF = """\
# the registry's config, with a comment of the user's that must survive
[Interface]
# wgpunch: endpoint = vpn.example.com:51820
Address = {address}
ListenPort = 51820

[Peer]
# a peer the user added by hand
PublicKey = {user}
AllowedIPs = 10.99.0.9/32
"""


@dataclass
class Host:
    side: Side
    conf: Path
    user: Key

    def snapshot(self) -> tuple[str, list[list[str]]]:
        """The config file's text and `wg show dump` of the device: what must not change."""
        return self.conf.read_text(), sorted(self.side.wg_show_dump()[1:])

    @property
    def device(self) -> UapiDevice:  # a fresh one per operation, as the CLI opens one
        return UapiDevice(self.side.ifname)


def host_for(side: Side, tmp: Path, address: str = "10.99.0.254/24") -> Host:
    user = generate_keypair()[1]
    side.wg_set("peer", user.base64(), "allowed-ips", "10.99.0.9/32")
    conf = tmp / "etc" / "wg0.conf"
    conf.parent.mkdir(exist_ok=True)
    conf.write_text(REGISTRY_CONF.format(address=address, user=user.base64()))
    return Host(side, conf, user)


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    with wg_pair(tmp_path, unique_prefix("ob")) as (a, _):
        yield host_for(a, tmp_path)


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[None]:
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("chattr +i does not work here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- invite and revoke -----------------------------------------------------------------------

async def test_invite_adds_the_node_to_device_and_file_and_writes_its_config(host, tmp_path):
    out = tmp_path / "laptop.conf"
    got = await invite(host.device, host.conf, "laptop", out=out)
    assert got.address == ipaddress.ip_address("10.99.0.1")
    peers = {row[0]: row for row in host.side.wg_show_dump()[1:]}
    assert peers[got.public_key.base64()][3] == "10.99.0.1/32"
    assert peers[got.public_key.base64()][1] == "(none)"  # no preshared key
    config = WgQuickConfig.parse(host.conf.read_text())
    assert "# a peer the user added by hand" in host.conf.read_text()
    block = members.member(config, "laptop")
    assert block is not None and block.value("PublicKey") == got.public_key.base64()
    assert mode(out) == mode(host.conf) == 0o600

    node = WgQuickConfig.parse(out.read_text())
    assert node.interface is not None
    private = Key.from_base64(node.interface.value("PrivateKey") or "", secret=True)
    assert public_key(private) == got.public_key
    assert node.interface.values("Address") == ["10.99.0.1/24"]
    assert node.interface.value("ListenPort") == str(members.LISTEN_BASE + 1)
    [registry] = node.peers
    assert (registry.value("PublicKey"), registry.value("AllowedIPs"), registry.value("Endpoint"),
            registry.value("PersistentKeepalive")) == (
        host.side.public.base64(), "10.99.0.254/32", "vpn.example.com:51820", "25")

    second = await invite(host.device, host.conf, "phone")
    assert second.address == ipaddress.ip_address("10.99.0.2")  # .9 is the user's; .1 taken
    assert members.members(WgQuickConfig.parse(host.conf.read_text())) == ["laptop", "phone"]

    assert await revoke(host.device, host.conf, "laptop") == got.public_key
    assert got.public_key.base64() not in {row[0] for row in host.side.wg_show_dump()[1:]}
    assert members.members(WgQuickConfig.parse(host.conf.read_text())) == ["phone"]
    assert host.user.base64() in host.conf.read_text()


@pytest.mark.parametrize(("intent", "name", "kwargs", "error"), [
    ("a name in use", "taken", {}, "the name 'taken' is in use"),
    ("an address in a peer's allowed IPs", "new", {"address": "10.99.0.9"},
     "address 10.99.0.9 is in use"),
    ("the registry's own address", "new", {"address": "10.99.0.254"},
     "address 10.99.0.254 is in use"),
    ("an address outside the network", "new", {"address": "10.98.0.1"},
     "is not a host address of the registry's network 10.99.0.0/24"),
    ("a bad name", "../x", {}, "name '../x': use 1-15 letters"),
    ("a name too long for wg-quick", "sixteen-letters1", {}, "use 1-15 letters"),
    ("an output file that exists", "new", {"out": "exists"}, "/exists exists; remove it"),
])
async def test_an_invite_error_changes_neither_device_nor_file(host, tmp_path, intent, name,
                                                                kwargs, error):
    await invite(host.device, host.conf, "taken")
    (tmp_path / "exists").write_text("mine")
    if "address" in kwargs:
        kwargs["address"] = ipaddress.ip_address(kwargs["address"])
    if "out" in kwargs:
        kwargs["out"] = tmp_path / kwargs["out"]
    before = host.snapshot()
    with pytest.raises(ConfigError) as caught:
        await invite(host.device, host.conf, name, **kwargs)
    assert str(caught.value).startswith("invite: ") and error in str(caught.value), intent
    assert host.snapshot() == before, intent
    assert (tmp_path / "exists").read_text() == "mine"
    assert not list(host.conf.parent.glob(".*.tmp"))


async def test_a_full_network_is_a_clear_error(tmp_path):
    with wg_pair(tmp_path, unique_prefix("ob")) as (a, _):
        host = host_for(a, tmp_path, "10.99.0.14/29")  # hosts .9-.14: the user's .9, ours .14
        for name in "abcd":
            await invite(host.device, host.conf, name)
        before = host.snapshot()
        with pytest.raises(ConfigError, match=r"network 10.99.0.8/29 is full"):
            await invite(host.device, host.conf, "e")
        assert host.snapshot() == before


async def test_an_unwritable_config_changes_nothing_before_or_after_the_device(host):
    before = host.snapshot()
    with immutable(host.conf.parent), pytest.raises(ConfigError, match="cannot write"):
        await invite(host.device, host.conf, "laptop", out=host.conf.parent / "laptop.conf")
    assert host.snapshot() == before
    with immutable(host.conf), pytest.raises(ConfigError, match="cannot write"):
        await invite(host.device, host.conf, "laptop")  # the device had it for a moment
    assert host.snapshot() == before
    got = await invite(host.device, host.conf, "laptop")
    (host.conf.parent.parent / "psk").write_text(generate_keypair()[0].base64())
    host.side.wg_set("peer", got.public_key.base64(), "preshared-key",
                     str(host.conf.parent.parent / "psk"))  # set by hand: must survive
    before = host.snapshot()
    with immutable(host.conf), pytest.raises(ConfigError, match="cannot write"):
        await revoke(host.device, host.conf, "laptop")
    assert host.snapshot() == before


async def test_revoke_errors_and_a_peer_already_gone(host):
    with pytest.raises(ConfigError, match=r"^revoke: no node 'nobody' in .* \(invited: x\)$"):
        await invite(host.device, host.conf, "x")
        await revoke(host.device, host.conf, "nobody")
    key = members.member(WgQuickConfig.parse(host.conf.read_text()), "x")
    assert key is not None
    host.side.wg_set("peer", key.value("PublicKey") or "", "remove")  # removed by hand
    await revoke(host.device, host.conf, "x")
    assert members.members(WgQuickConfig.parse(host.conf.read_text())) == []


# -- init registry and the command line ---------------------------------------------------------

def test_init_registry_writes_key_and_config_and_never_replaces(tmp_path, capsys):
    argv = ["init", "registry", "--endpoint", "vpn.example.com:51999", "--network",
            "10.99.0.0/24", "--dir", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "let UDP port 51999 in" in out and "wg-quick up wg0" in out
    key = Key.from_base64((tmp_path / "wg0.key").read_text().strip(), secret=True)
    assert key.base64() not in out
    conf = WgQuickConfig.parse((tmp_path / "wg0.conf").read_text())
    assert conf.interface is not None
    assert (conf.interface.values("Address"), conf.interface.value("ListenPort"),
            conf.interface.mark("endpoint")) == (["10.99.0.254/24"], "51999",
                                                 "vpn.example.com:51999")
    assert mode(tmp_path / "wg0.key") == mode(tmp_path / "wg0.conf") == 0o600

    (tmp_path / "wg1.conf").write_text("mine")  # one of the two exists: neither is written
    assert main([*argv, "-i", "wg1"]) == 1
    assert "wg1.conf exists" in capsys.readouterr().err
    assert not (tmp_path / "wg1.key").exists() and (tmp_path / "wg1.conf").read_text() == "mine"


@pytest.mark.parametrize(("argv", "error"), [
    (["--endpoint", "vpn.example.com", "--network", "10.99.0.0/24"], "expected HOST:PORT"),
    (["--endpoint", "2001:db8::1:51820", "--network", "10.99.0.0/24"], "needs brackets"),
    (["--endpoint", "h:70000", "--network", "10.99.0.0/24"], "expected HOST:PORT"),
    (["--endpoint", "h:1", "--network", "10.99.0.0/31"], "too small"),
    (["--endpoint", "h:1", "--network", "nonsense"], "is not a CIDR"),
])
def test_init_registry_errors_are_one_line(tmp_path, capsys, argv, error):
    assert main(["init", "registry", *argv, "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert error in err and err.count("\n") == 1
    assert os.listdir(tmp_path) == []


def test_invite_without_the_device_is_one_line(tmp_path, capsys):
    (tmp_path / "wg0.conf").write_text(REGISTRY_CONF.format(address="10.99.0.254/24",
                                                            user=generate_keypair()[1]))
    assert main(["invite", "x", "-i", "nosuchwg9", "--config", str(tmp_path / "wg0.conf")]) == 1
    err = capsys.readouterr().err
    assert "the registry's interface must be up (wg-quick up nosuchwg9)" in err
    assert err.count("\n") == 1


class Refusing(UapiDevice):
    """The real device, but every change is refused (as a device in trouble would)."""

    async def _write(self, changes):
        raise DeviceError("uapi: refused for the test", errno.EIO)


async def test_a_device_that_refuses_the_revoke_leaves_file_and_peer_with_its_preshared_key(
        host, tmp_path):
    got = await invite(host.device, host.conf, "laptop")
    (tmp_path / "psk").write_text(generate_keypair()[0].base64())
    host.side.wg_set("peer", got.public_key.base64(), "preshared-key", str(tmp_path / "psk"))
    before = host.snapshot()
    with pytest.raises(ConfigError, match=r"^revoke: changing .* failed, nothing changed"):
        await revoke(Refusing(host.side.ifname), host.conf, "laptop")
    assert host.snapshot() == before  # the preshared key included: nothing was re-added
    assert not list(host.conf.parent.glob(".*.tmp"))
