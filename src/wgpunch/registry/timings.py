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
    # A watch stream that has said nothing for this long gets a heartbeat line. Nodes call a
    # stream dead after 4.5 s of silence (docs/api.md), and a dead stream is how a node learns
    # that its own NAT lost its state, so this bounds recovery after a NAT reboot
    # (bench/time_to_direct.py, "flush"). One short line per node every 2 s is cheap.
    heartbeat_s: float = 2.0
    # At most one punch per pair within this window; repeats inside it are answered without
    # pushing again. Our choice: both nodes ask when they notice the same need, usually within
    # one registry round trip of each other, and one push serves both. Shorter than the
    # node's quickest retry (0.5 s, wgpunch.node.decide.Timings), so retries are not eaten.
    punch_coalesce_s: float = 0.25
    # A refused source address is logged at most once per this period (docs/api.md).
    forbidden_log_s: float = 60.0
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
