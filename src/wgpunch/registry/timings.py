"""Every timer of the registry in one place: what each bounds and where its value comes from.

Tests pass a shorter `Timings`; nothing reads a module global.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True, slots=True)
class Timings:
    # How often the observer reads the registry's own device. Our choice: the registry seeing a
    # node's new endpoint is on the time-to-direct path (goal: p95 < 1 s end to end), so this
    # adds at most 0.2 s; a UAPI `get` of a small device costs about a millisecond.
    poll_interval_s: float = 0.2
    # For this long after a read that found a peer new, gone or with another endpoint or
    # allowed IPs, and after a node reported something new or asked for a punch, the
    # observer reads every `poll_fast_factor` x poll_interval_s (0.05 s as shipped; slower
    # where reads are slow: observer.py). Our choice: changes come together (a node that
    # restarts handshakes, reports and punches; a punch follows a path that died), and an
    # endpoint change waits for the next read: at 1,000 nodes and 10 % of them changing per
    # minute that wait was most of a change's p95 to every stream (bench/registry_scale.py).
    # A quiet device keeps the slow pace.
    poll_fast_for_s: float = 5.0
    poll_fast_factor: float = 0.25
    # A watch stream that has said nothing for this long gets a heartbeat line. Nodes call a
    # stream dead after 4.5 s of silence (docs/api.md), and a dead stream is how a node learns
    # that its own NAT lost its state, so this bounds recovery after a NAT reboot
    # (bench/time_to_direct.py, "flush"). One short line per node every 2 s is cheap.
    heartbeat_s: float = 2.0
    # At most one punch per pair within this window; repeats inside it are answered without
    # pushing again. Our choice: both nodes ask when they notice the same need, usually within
    # one registry round trip of each other, and one push serves both. Shorter than the
    # node's quickest retry (0.5 s, wgpunch.node.timings.Timings), so retries are not eaten.
    punch_coalesce_s: float = 0.25
    # A refused source address is logged at most once per this period (docs/api.md); so is
    # every other client-caused condition (a refused connection, a timeout, a rate limit, a
    # malformed request), per client and kind. Our choice.
    forbidden_log_s: float = 60.0
    # A connection must deliver a complete request head within this long of opening, and the
    # next head within this long of its first byte. A head is a few hundred bytes in one
    # segment: 5 s leaves room for two TCP retransmissions (RFC 6298: 1 s, then 2 s) on a
    # lossy path. Until then a connection holds a file descriptor and has told us nothing.
    head_timeout_s: float = 5.0
    # A keep-alive connection with no request for this long is closed. Above the 15 s the
    # node agent keeps one (node/http.py IDLE_S, as aiohttp's client does), so that the
    # client, not the registry, closes an idle connection, and never one it is about to send on.
    idle_timeout_s: float = 20.0
    # A request body (at most 4 KiB, docs/api.md) must be complete within this long of the
    # head: as head_timeout_s.
    body_timeout_s: float = 5.0
    # A watch-stream line the client has not taken within this long ends the stream (and its
    # connection). A node calls a stream dead after 4.5 s of silence (docs/api.md); this only
    # bounds how long a client that stopped reading keeps a connection. Our choice: a
    # snapshot line of a 10,000-node registry (~4 MB) still gets through at 1 Mbit/s.
    stream_write_timeout_s: float = 40.0
    # A node whose observed endpoint moved gets a kick (kick.py) at once and every
    # kick_again_s after, `kicks` in all (1.5 s), while the stream it had stays open: against
    # a lost datagram (the lab's forget case has 5 % loss on each uplink) and a NAT that lost
    # the new mapping again before the node's next packet (the lab's forget flushes its NAT
    # in two steps; the node's next heartbeat comes within a second). Our choice: a round trip
    # and the node's own wait before it watches anew (node/kick.py), inside the 2 s goal.
    kick_again_s: float = 0.3
    kicks: int = 6
    # After accept() fails for lack of file descriptors or memory, the API tries again after
    # this long, not in a busy loop. asyncio's own server waits 1 s (ACCEPT_RETRY_DELAY);
    # connections wait in the kernel's backlog meanwhile.
    accept_retry_s: float = 0.5
    # A failing device read is logged at most once per this period while it keeps failing
    # (at 0.2 s polls it would otherwise be 300 lines a minute). Our choice.
    device_error_log_s: float = 30.0
    # A DNS-over-TCP connection with no complete query for this long is closed. The value of
    # miekg/dns (IdleTimeout 8 s), the server wgsd runs in; RFC 7766 §6.2.3 asks for seconds.
    dns_tcp_idle_s: float = 8.0
    # A source sending malformed DNS packets is logged at most once per this period. Our choice,
    # as forbidden_log_s.
    dns_malformed_log_s: float = 60.0
    # How long shutdown waits for requests in flight after watch streams were told to end.
    # Our choice: handlers here finish in milliseconds once their stream is closed.
    shutdown_grace_s: float = 2.0

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"registry: timing {name}={value!r} must be a positive number")
