"""wgpunch's well-known ports, in one table: the daemons' defaults, each beside the others.

Here, not in the code that serves them, so that options and `--help` can name them without
loading that code (`wgpunch node --help`, bench/startup.py); the protocol modules re-export
theirs.
"""

API_PORT = 51821  # the registry's HTTP API (docs/api.md): next to WireGuard's customary 51820
RENDEZVOUS_PORT = 51822  # a natpunch rendezvous server: ours (natpunch-go has none)
NATPROBE_PORT = 51823  # the registry's NAT probe (docs/api.md); its second port: the next one
RELAY_CONTROL_PORT = 51825  # a relay's control API, TCP (registry/relaycontrol.py)
KICK_PORT = 51826  # UDP, on a node's tunnel address: the registry's kick (protocol/kickwire.py)
LEGACY_PORT = 49918  # the wireguard-tools example's rendezvous server: fixed there
