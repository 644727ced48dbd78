"""The registry: a WireGuard peer of every node that publishes what its interface observes.

Modules, one concern each:
- `timings.py`  every timer of the registry, in one commented dataclass;
- `report.py`   what a node says about itself (`PUT /v1/self`), validated on construction;
- `state.py`    the peer table, revisions, history, epoch and watch-stream fan-out;
- `punch.py`    punch coalescing and the initiator tie-break;
- `observer.py` reads the registry's own device and feeds the table;
- `auth.py`     who is calling (source address → peer key), bearer token;
- `wire.py`     JSON forms of records and events, query and path parsing;
- `api.py`      the aiohttp application (docs/api.md);
- `dnssd.py`    wgsd-compatible DNS-SD answers: query in, response out (DESIGN.md §5);
- `dnswire.py`  fitting a DNS response into a UDP or TCP message (truncation, TC);
- `dnsserver.py` the DNS-SD server on UDP and TCP, and the registry's own `self` record;
- `listen.py`   which addresses to listen on (API and DNS);
- `cli.py`      `wgpunch registry`.
"""
