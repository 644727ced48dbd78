"""Two wireguard-go devices in throwaway network namespaces, for device-level tests.

Namespaces `P-a` and `P-b` joined by a veth link (192.0.2.1 and 192.0.2.2, addresses that
exist only inside them), each running wireguard-go with a key and a listen port, each the
other's peer without an endpoint, as a user's config would have them before wgpunch acts.
Everything is removed on exit, whatever happened, with what a node agent on either device
left in the machine's directories (its lock: node/lock.py).
"""

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from wgpunch.keys import generate_keypair
from wgpunch.lab.netns import Namespace, WireguardGo, uapi_socket
from wgpunch.lab.state import remove_agent_files
from wgpunch.wg.uapi import UapiDevice

PORT = 51820


class Side:
    def __init__(self, prefix: str, name: str, veth_ip: str, tunnel_ip: str) -> None:
        self.ns = Namespace(f"{prefix}-{name}")
        self.ifname = f"{prefix}{name}wg"
        self.veth_ip = veth_ip
        self.tunnel_ip = tunnel_ip
        self.private, self.public = generate_keypair()
        self.daemon = WireguardGo(self.ns, self.ifname)
        self.device = UapiDevice(self.ifname)

    def wg_show_dump(self) -> list[list[str]]:
        out = self.ns.run(["wg", "show", self.ifname, "dump"]).stdout
        return [line.split("\t") for line in out.splitlines()]

    def wg_set(self, *args: str) -> None:
        self.ns.run(["wg", "set", self.ifname, *args])


def unique_prefix(start: str = "wd") -> str:
    """`start` + 4 hex digits that no namespace or UAPI socket on the machine uses now."""
    while True:
        prefix = start + secrets.token_hex(2)
        if not any(Namespace(f"{prefix}-{side}").exists() or
                   uapi_socket(f"{prefix}{side}wg").exists() for side in "ab"):
            return prefix


@contextmanager
def wg_pair(tmp_path: Path, prefix: str | None = None) -> Iterator[tuple[Side, Side]]:
    prefix = prefix or unique_prefix()
    a = Side(prefix, "a", "192.0.2.1", "10.77.0.1")
    b = Side(prefix, "b", "192.0.2.2", "10.77.0.2")
    try:
        for side in (a, b):
            side.ns.add()
        a.ns.run(["ip", "link", "add", f"{prefix}va", "type", "veth", "peer", "name",
                  f"{prefix}vb", "netns", b.ns.name])
        for side, veth in ((a, f"{prefix}va"), (b, f"{prefix}vb")):
            side.ns.run(["ip", "addr", "add", f"{side.veth_ip}/24", "dev", veth])
            side.ns.run(["ip", "link", "set", veth, "up"])
            side.daemon.start()
            keyfile = tmp_path / f"{side.ifname}.key"
            keyfile.write_text(side.private.base64())
            keyfile.chmod(0o600)
            side.wg_set("private-key", str(keyfile), "listen-port", str(PORT))
            side.ns.run(["ip", "addr", "add", f"{side.tunnel_ip}/24", "dev", side.ifname])
            side.ns.run(["ip", "link", "set", side.ifname, "up"])
        a.wg_set("peer", b.public.base64(), "allowed-ips", f"{b.tunnel_ip}/32",
             "persistent-keepalive", "25")
        b.wg_set("peer", a.public.base64(), "allowed-ips", f"{a.tunnel_ip}/32",
             "persistent-keepalive", "25")
        yield a, b
    finally:
        for side in (a, b):
            side.daemon.stop()
            side.ns.delete()
            remove_agent_files(side.ifname)
