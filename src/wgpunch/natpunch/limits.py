"""What a rendezvous server allows (`Limits`), and token buckets per source address for the
one message that costs it real work.

A natpunch-go handshake costs the server four X25519 operations before it knows whether the
sender holds a key it accepts; anyone who knows the server's public key can send them. A
client handshakes once per session (natpunch-go: every 5 minutes), so a few per second per
address is far above any honest need, and a global bucket caps what a spread-out flood costs.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Hashable
from dataclasses import dataclass

from .table import Table


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class Buckets:
    def __init__(self, rate: float, burst: float, *, sources_max: int = 65536) -> None:
        self.rate = rate
        self.burst = burst
        # A bucket left alone for burst/rate seconds is full again: no need to remember it.
        self._buckets: Table[Hashable, _Bucket] = Table(sources_max, burst / rate)

    def allow(self, source: Hashable, now: float) -> bool:
        bucket = self._buckets.get(source, now) or _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        allowed = bucket.tokens >= 1
        if allowed:
            bucket.tokens -= 1
        self._buckets.put(source, bucket, now)
        return allowed


# An IPv6 site gets a /64 at least (RFC 6177), and one host can use any address in it: a
# bucket per address would let one flooder have 2^64 of them.
IPV6_SOURCE_PREFIX = 64


def source_of(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Hashable:
    """Whom a per-source limit counts: an IPv4 address, or an IPv6 address's /64."""
    if ip.version == 4:
        return ip
    if ip.ipv4_mapped is not None:  # a dual-stack socket's view of an IPv4 sender
        return ip.ipv4_mapped
    return ipaddress.IPv6Network((ip, IPV6_SOURCE_PREFIX), strict=False)


@dataclass(frozen=True, slots=True)
class Limits:
    """Our choices; `wgpunch rendezvous --help` names them."""

    peers_max: int = 65536  # the wireguard-tools server's table size
    # Keys whose last handshake timestamp is kept after their entry expired, so that an old
    # handshake replayed then is refused (server.py); 13.6 MB at 65,536 (tracemalloc).
    stamps_max: int = 65536
    peer_ttl_s: float = 600.0  # ten minutes: beyond a cron client's period and a NAT's timeout
    session_ttl_s: float = 600.0  # natpunch-go handshakes again every 5 minutes
    handshakes_per_source_s: float = 5.0  # per IPv4 address or IPv6 /64
    handshake_burst: float = 20.0
    handshakes_per_s: float = 2000.0  # ~0.7 of a core here (bench/natpunch.py: 355 us each)
