"""How much of the registry's API one client may use: connections, watch streams, request
rates, header sizes. What each bounds and where its value comes from; the timers that go with
them (head, idle, body and stream-write timeouts) are in timings.py.

A client of the API is a *caller* (a peer: the source address lies in the allowed IPs of
exactly one peer) or a *source* that is no peer's: this host itself (loopback, or the address
it was reached on), or a stranger. Tests pass smaller `Limits`; nothing reads a global.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True, slots=True)
class Limits:
    # -- connections (registry/site.py) ---------------------------------------------------------
    # Open API connections in all, whatever the open-files limit allows. Our choice: three times
    # the 10,000 nodes bench/dns.py measures (one watch stream each, plus requests in flight);
    # an idle aiohttp connection costs ~20 KB, so this also bounds memory near 0.7 GB.
    max_connections: int = 32768
    # File descriptors kept free for everything but API connections, so that a full API never
    # makes the observer's device reads fail ("Too many open files"): DNS-over-TCP's own cap
    # (dnsserver.TCP_CLIENTS_MAX, 128), the observer's UAPI/netlink sockets and worker threads,
    # log files, listening sockets. The API stops accepting at open-files limit minus this.
    fd_reserve: int = 256
    # Connections of one caller (all its source addresses together). A node agent holds one
    # watch stream and makes its requests on one keep-alive connection, but asks for punches
    # in parallel: at its start in a 50-node mesh, up to ~50 at once (its client opens a
    # connection per concurrent request, node/http.py, at most 32). Beyond this, new
    # connections are closed at accept.
    caller_connections: int = 64
    # Connections of one source address that is no peer's (this host, a stranger).
    # Our choice: a monitor polling /healthz needs one.
    source_connections: int = 4
    # Connections of all strangers together: they get /healthz and 403s only, so a host
    # outside the tunnel that can reach the API costs at most this many file descriptors.
    stranger_connections: int = 16

    # -- watch streams (api.py) -----------------------------------------------------------------
    # Open watch streams of one caller; a new one beyond this closes that caller's oldest.
    # An agent has one; a stream it gave up for dead (silence, a NAT reboot) may live on here
    # until TCP notices, and its replacement must not be refused meanwhile.
    caller_streams: int = 4

    # -- request rates (middleware.py pacing, request.py rate_limit; token buckets per caller) --
    # Requests of one caller handled per second, whatever its number of connections; beyond,
    # a request waits for its turn (pacing: the answer comes later), so that a flood costs
    # what this many requests cost and the others' requests are not queued behind it. Sources
    # that are no peer's get the same, per address for this host, one budget for all
    # strangers. An agent makes a few requests a minute, plus one per peer at its start
    # (punches): within the burst. Our choice; a request costs ~0.3 ms here (small table).
    requests_burst: int = 100
    requests_per_s: float = 20.0
    # `PUT /v1/self`: an agent reports once a minute (node/follow.py report_every_s), again on a
    # registry restart, and retries a failed report after 2 s. A burst of 10, then one per 6 s,
    # is several times that; a flood of changed reports would otherwise push every node's
    # resumable history (state.HISTORY_MAX) out within seconds.
    report_burst: int = 10
    report_per_s: float = 1 / 6
    # `POST /v1/punch/{peer}`: an agent asks once per peer that needs it, re-asking after 0.5 s
    # and then doubling (node/decide.py first_retry_s); the registry coalesces a pair within
    # 0.25 s anyway. A burst of 64 (a node starting in a 64-node mesh), then 8 per second.
    punch_burst: int = 64
    punch_per_s: float = 8.0
    # `POST /v1/relay/{peer}`: an agent asks once per peer whose punch got no handshake
    # within about a second, and again only when its slot ended. Our choice: a burst of 16,
    # then 2 per second; each slot also counts against the node's slots (relayslots.py).
    relay_burst: int = 16
    relay_per_s: float = 2.0

    # -- request heads (aiohttp's parser; api.py handler_kwargs) --------------------------------
    # The longest request line and header line. Our requests' lines are under 200 bytes (a
    # percent-encoded key in a path is 60); a bearer token fits in a few hundred. With
    # max_headers, a request head buffers at most ~64 KB per connection.
    max_line_bytes: int = 2048
    max_headers: int = 32

    # -- logging ----------------------------------------------------------------------------------
    # Lines per kind (refused, timed out, rate-limited, malformed...) per log period
    # (Timings.forbidden_log_s) across all clients, on top of one per client and kind: a client
    # using many source addresses cannot make the log grow with their number.
    log_lines_per_kind: int = 20

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"registry: limit {name}={value!r} must be a positive number")
