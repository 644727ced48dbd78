"""Which peers carry traffic now: the ones whose NAT mappings are worth holding open between
persistent keepalives (registrylink.py sends them an opener with each heartbeat).

A peer is active while bytes from it arrived in two successive reads, and for `active_s`
after the last such arrival. Two in a row, because a lone keepalive (every 25 s) or a
handshake is no traffic worth a packet a second; `active_s`, because a NAT that lost its state
stops the peer's bytes, and that is when our packets must go on. Nothing that the agent sends
itself raises the counter: the openers die before the peer's NAT.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..keys import Key
from ..wg.model import PeerState


@dataclass(slots=True)
class _Seen:
    rx_bytes: int
    grew: bool  # at the last read
    active_until: float  # monotonic; 0: not active


class Activity:
    def __init__(self, active_s: float) -> None:
        self.active_s = active_s
        self._seen: dict[Key, _Seen] = {}

    def observe(self, peers: tuple[PeerState, ...], now: float) -> list[PeerState]:
        """Note the peers' counters as read at `now`; the peers active now."""
        active = []
        seen: dict[Key, _Seen] = {}
        for peer in peers:
            old = self._seen.get(peer.public_key)
            if old is None:
                seen[peer.public_key] = _Seen(peer.rx_bytes, False, 0.0)
                continue
            grew = peer.rx_bytes > old.rx_bytes
            until = now + self.active_s if grew and old.grew else old.active_until
            seen[peer.public_key] = _Seen(peer.rx_bytes, grew, until)
            if now < until:
                active.append(peer)
        self._seen = seen
        return active
