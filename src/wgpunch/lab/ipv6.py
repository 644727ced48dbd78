"""IPv6 on a lab NAT router: routed to the LAN, never translated (as home routers do with a
delegated prefix), and either open or behind a stateful firewall.

`firewall` is the RFC 6092 default a home router ships with: the forward chain lets in what
belongs to a flow the LAN started (`ct state established,related`) and drops every unsolicited
packet from outside. A dropped packet's conntrack entry is never confirmed, so, unlike the
IPv4 `collision` kind, an unsolicited packet leaves no state behind: a host opens its
firewall toward a peer by sending to it first (node/punch.py, an opener from the WireGuard
port). `open` installs nothing: every packet is forwarded. `blocked` is a firewall that
lets no UDP in over IPv6 at all, replies included (as some corporate and carrier firewalls
do): IPv6 is there, and every attempt over it fails, so a pair must fall back to IPv4.
"""

from __future__ import annotations


def firewall6(policy: str, table: str, lan: str) -> str | None:
    """The nft script (for `nft -f -` in the router's namespace) of an IPv6 policy, None for
    `open`; `lan` is the router's LAN bridge."""
    if policy == "open":
        return None
    rules = (["ct state established,related accept", f'iifname "{lan}" accept']
             if policy == "firewall" else
             [f'iifname != "{lan}" meta l4proto udp drop', "accept"])
    body = "".join(f"    {rule}\n" for rule in rules)
    return (
        f"table ip6 {table} {{\n"
        "  chain forward_filter {\n"
        "    type filter hook forward priority filter; policy drop;\n"
        f"{body}"
        "  }\n"
        "}\n"
    )
