"""The registry: a WireGuard peer of every node that publishes what its interface observes.

Modules, one concern each (what the registry and the node share is in protocol/):
- `timings.py`   every timer of the registry, in one commented dataclass;
- `limits.py`    how much of the API one client may use, and why each number;
- `state.py`     the peer table, revisions, history, epoch and watch-stream fan-out;
- `punch.py`     punch coalescing (who initiates: protocol/roles.py);
- `observer.py`  reads the registry's own device and feeds the table;
- `auth.py`      who is calling (source address -> peer key), bearer token;
- `connlimit.py` who may hold how many connections, and for how long without a request;
- `ratelimit.py` token buckets per caller (429s and pacing);
- `clientlog.py` log lines about clients, bounded per client and kind;
- `site.py`      the API's own accept loop (caps before a byte is read, no fd exhaustion);
- `wire.py`      query and path parsing;
- `api.py`       the aiohttp application: its handlers (docs/api.md);
- `appkeys.py`   what the application holds, under typed keys;
- `middleware.py` JSON errors, pacing and who is calling, around every handler;
- `request.py`   what a handler does with a request: rate, body, the peer in the path, JSON;
- `dnssd.py`     wgsd-compatible DNS-SD answers: query in, response out (DESIGN.md §5);
- `dnswire.py`   fitting a DNS response into a UDP or TCP message (truncation, TC);
- `dnsaccess.py` who may ask the DNS-SD server (peers through the tunnel, allowed networks);
- `dnsserver.py` the DNS-SD server on UDP and TCP, and the registry's own `self` record;
- `listen.py`    which addresses to listen on (API and DNS);
- `serve.py`     the daemon put together: started, served, released in order;
- `cli.py`       `wgpunch registry`: its flags, environment and TOML file, into `Settings`.
"""
