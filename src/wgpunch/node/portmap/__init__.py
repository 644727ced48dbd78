"""Port mapping on the NAT in front of the node (DESIGN.md §3, candidate "mapped"):
- `natpmp.py`, `pcp.py`  NAT-PMP (RFC 6886) and PCP (RFC 6887) messages, pure codecs;
- `transport.py`        one retransmitted UDP exchange with the gateway;
- `upnp.py`             UPnP-IGD through miniupnpc, imported only when used;
- `gateway.py`          the default gateway, from the routing table;
- `mapper.py`           the task that maps, renews, re-maps and deletes;
- `rule.py`             who sends first when a peer's mapping is the way in.
"""
