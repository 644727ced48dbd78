"""Reading `conntrack -L` output in the lab tests.

A relay slot's flows are the ones whose *original* destination port is a slot port. Matching
`port=31000` anywhere on the line also catches a symmetric NAT's random source port (and the
reply tuple's copy of it), which made the check fail now and then."""

from __future__ import annotations

import re

from wgpunch.lab.netns import Namespace

_ORIGINAL_DPORT = re.compile(r"\bdport=(\d+)\b")


def flows_to_ports(ns: Namespace, ports: range) -> list[str]:
    """The UDP conntrack entries in `ns` whose original destination port is in `ports`."""
    out = ns.run(["conntrack", "-L", "-p", "udp"], check=False).stdout
    found = []
    for line in out.splitlines():
        first = _ORIGINAL_DPORT.search(line)
        if first is not None and int(first.group(1)) in ports:
            found.append(line)
    return found
