"""Port mapping in a lab NAT router: the real miniupnpd (NAT-PMP, PCP and UPnP-IGD).

A NAT with `portmap` runs `miniupnpd -d` (foreground, our child) in its namespace with a
config file in the lab's state directory. Its nftables backend adds its DNAT and accept rules
to chains of an `inet` table of its own (`P_upnp`, created here as its nft_init.sh would), so
the lab's NAT table (nat.py) stays as it is, except for one rule there that lets what
miniupnpd DNATs pass the lab's forward filter (an nftables drop in any base chain wins).

miniupnpd disables forwarding on a WAN address from a reserved range, which the lab's public
addresses are, unless STUN shows the router is not behind a restrictive NAT; so it asks the
lab's STUN responder (stun.py) on the registry host, which a router on the core reaches
without any NAT in between. A portmap NAT therefore must sit directly on the core.

Every mapping is confined to the router's LAN, as secure_mode and the permission rules of a
home router do: a host maps only its own address, ports 1024-65535.
"""

from __future__ import annotations

import subprocess
import uuid
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from ..errors import LabError
from .nat import NatInterfaces
from .netns import Namespace, wait_for

MINIUPNPD = "/usr/sbin/miniupnpd"
STUN_PORT = 3478  # RFC 5389 §18.4
NATPMP_PORT = 5351  # RFC 6886 §3, RFC 6887 §19.1: NAT-PMP and PCP share it
# PCP lifetimes the router grants (RFC 6887 §15 suggests 120 s-24 h): the floor is low so
# that tests see a lease renewed in seconds, not minutes.
MIN_LIFETIME_S = 2
MAX_LIFETIME_S = 86400
START_S = 10.0  # miniupnpd's STUN check takes one round trip to the registry host here


@dataclass(frozen=True)
class Names:
    """miniupnpd's nftables objects in the router's namespace."""

    table: str  # `inet` family, holds every chain below
    forward: str = "miniupnpd"
    nat: str = "prerouting_miniupnpd"
    postrouting: str = "postrouting_miniupnpd"


def names(prefix: str) -> Names:
    return Names(table=f"{prefix}_upnp")


def nft_script(n: Names) -> str:
    """The table miniupnpd expects (miniupnpd's nft_init.sh), with an accepting forward
    policy: the lab's own forward filter (nat.py) is the one that drops."""
    return (
        f"table inet {n.table} {{\n"
        "  chain forward {\n"
        "    type filter hook forward priority filter; policy accept;\n"
        f"    jump {n.forward}\n"
        "  }\n"
        f"  chain {n.forward} {{\n  }}\n"
        "  chain prerouting {\n"
        "    type nat hook prerouting priority dstnat; policy accept;\n"
        f"    jump {n.nat}\n"
        "  }\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        f"    jump {n.postrouting}\n"
        "  }\n"
        f"  chain {n.nat} {{\n  }}\n"
        f"  chain {n.postrouting} {{\n  }}\n"
        "}\n"
    )


def config(where: NatInterfaces, n: Names, stun: IPv4Address, leases: Path) -> str:
    """miniupnpd.conf for the router at `where` (see miniupnpd.conf(5) for each key)."""
    lan = where.lan_net
    return "\n".join([
        f"ext_ifname={where.wan}",
        f"listening_ip={where.lan}",
        "ext_perform_stun=yes",
        f"ext_stun_host={stun}",
        f"ext_stun_port={STUN_PORT}",
        "ipv6_disable=yes",
        "enable_upnp=yes",
        "enable_natpmp=yes",  # NAT-PMP and PCP (one listener, RFC 6887 §19.1)
        f"min_lifetime={MIN_LIFETIME_S}",
        f"max_lifetime={MAX_LIFETIME_S}",
        "secure_mode=yes",
        "system_uptime=no",
        f"uuid={uuid.uuid4()}",
        f"lease_file={leases}",
        f"upnp_table_name={n.table}",
        f"upnp_nat_table_name={n.table}",
        f"upnp_forward_chain={n.forward}",
        f"upnp_nat_chain={n.nat}",
        f"upnp_nat_postrouting_chain={n.postrouting}",
        f"allow 1024-65535 {lan} 1024-65535",
        "deny 0-65535 0.0.0.0/0 0-65535",
    ]) + "\n"


def start(ns: Namespace, prefix: str, router: str, where: NatInterfaces, stun: IPv4Address,
          state_dir: Path) -> subprocess.Popen[bytes]:
    """miniupnpd in router `router`'s namespace, once it serves with forwarding enabled."""
    n = names(prefix)
    ns.run(["nft", "-f", "-"], input=nft_script(n))
    conf = state_dir / f"miniupnpd-{router}.conf"
    log = state_dir / f"miniupnpd-{router}.log"
    conf.write_text(config(where, n, stun, state_dir / f"miniupnpd-{router}.leases"))
    with open(log, "ab") as output:
        proc: subprocess.Popen[bytes] = ns.popen(
            [MINIUPNPD, "-d", "-f", str(conf), "-P", str(state_dir / f"miniupnpd-{router}.pid")],
            stdin=subprocess.DEVNULL, stdout=output, stderr=output, start_new_session=True,
        )

    def serving() -> bool:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip()[-300:]
            raise LabError(f"lab: miniupnpd in {router} exited ({proc.returncode}): {tail}")
        text = log.read_text(errors="replace")
        if "Port forwarding is now disabled" in text:
            why = "; ".join(line.split(": ", 1)[-1] for line in text.splitlines()
                            if "perform_stun" in line)
            raise LabError(f"lab: miniupnpd in {router}: STUN found a restrictive NAT, "
                           f"so forwarding is off ({why or 'no detail'})")
        return "Port forwarding is now enabled" in text and "NAT-PMP" in text

    try:
        wait_for(serving, timeout=START_S, what=f"miniupnpd in {router}")
    except BaseException:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        raise
    return proc
