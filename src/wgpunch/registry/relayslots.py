"""Relay slots, purely: which ports a pair has, how a side gets bound, what is forwarded,
when a slot ends. No sockets and no clock (`now` is monotonic seconds, an argument), so the
rules read as a table (tests/test_registry_relayslots.py); relay.py moves the bytes.

A slot serves one pair (A, B) with two UDP ports: A's device sends to `pA`, B's to `pB`
(DESIGN.md §6). Side A is *bound* by the first datagram on `pA` that comes from A's public IP
as the registry observes it (any port: a symmetric NAT picks a new one toward the relay) and
is shaped like a WireGuard message (relayshape.py); from then on only datagrams from that
exact address are taken on `pA`, and they go out of `pB` to B's bound address. A datagram
for a side that is not bound yet is dropped: both nodes send a handshake initiation to their
port, the first to arrive binds its side and is lost, the second binds its side and is
delivered, and its answer goes back through both bindings.

A side moves (`rebound`) only to a handshake initiation from the node's observed IP after its
bound address has been quiet for `rebind_quiet_s`: a NAT that gave the node a new port makes
WireGuard initiate again from it; a packet from a new port while the bound one is active is
someone else's (a replay, an injection) and dropped. A node that asked for the slot again
(`let_move`, through the authenticated API) has lost its path through it: its next datagram
from its IP moves its side, whatever its kind and port, within `rebind_quiet_s` of the ask.
Until then the bound address still forwards: asking again costs a side that still works
nothing (both sides of a pair may ask at once, and the second ask would otherwise unbind a
side its node has just bound, until WireGuard's next initiation 5 s later).

A slot is *paused* when its pair moved back to a direct path (`POST /v1/relay/{peer}/direct`):
it forwards nothing, so a datagram still on its way through it cannot make either device
roam back to the relay; a node that asks for the slot again resumes it (its direct path
failed, node/upgrade.py). A paused slot expires as an idle one.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..errors import ConfigError, RequestRefused
from ..keys import Key
from ..protocol import pair_of
from .relayshape import MessageType, message_type


@dataclass(frozen=True, slots=True)
class RelayLimits:
    # Our choice: a node relays to a handful of peers at most in a sane mesh (relaying is the
    # last resort); this bounds what one node can take of the port range.
    slots_per_node: int = 16
    # Per side of a slot, on either path: 1 Gbit/s of 1,400-byte datagrams is ~90,000 per
    # second, so a pair may use a gigabit; the userspace path reaches less (bench/relay.py),
    # and there this stops one slot from starving the others on the relay's core.
    packets_per_s: float = 100_000.0
    packets_burst: int = 20_000


@dataclass(frozen=True, slots=True)
class RelayTimings:
    # A slot whose sides were not both bound within this long is given back: both nodes
    # send to it within a second of asking (node/relay.py).
    bind_timeout_s: float = 30.0
    # A bound slot with no datagram either way for this long is given back. Above
    # WireGuard's keepalive (25 s, set by the node agent) with one lost.
    idle_timeout_s: float = 60.0
    # A bound address quiet this long may be replaced by an initiation from a new port of
    # the node's IP (its NAT rebinding). Above WireGuard's keepalive (25 s, which the agent
    # sets): a bound address that sends not even keepalives is gone. Not shorter, because
    # the node's public IP may be shared (a carrier NAT), and a neighbour there could
    # otherwise take over a slot that is merely idle. A node gets its side unbound at once
    # by asking for the slot again (`Relay.allocate`), which only it can do.
    rebind_quiet_s: float = 30.0
    # Both sides of a pair may see their probe answered and ask to go direct within a round
    # trip of each other: one switch, not two (node/upgrade.py).
    direct_coalesce_s: float = 2.0
    # How often slots are checked for expiry.
    sweep_s: float = 5.0
    # How often the kernel path's counters are read, while it forwards a slot: what tells
    # the relay that a side is still sending (for rebind_quiet_s and idle_timeout_s). Half
    # of rebind_quiet_s, so that a side sending steadily never looks quiet; an nft read
    # costs a few ms.
    kernel_poll_s: float = 1.0


# A UDP address as the socket reports it: the relay compares these per datagram, so they stay
# the socket's own tuples (no parsing on the forwarding path).
Address = tuple[str, int]


class Verdict(enum.StrEnum):
    FORWARD = "forward"
    BOUND = "bound"  # the side was bound by this datagram (forwarded if the other is bound)
    REBOUND = "rebound"  # the side moved to a new address (forwarded likewise)
    NOT_WIREGUARD = "not shaped like a WireGuard message"
    WRONG_SOURCE = "not from the node's observed IP"
    NEW_SOURCE = "from a new address while the bound one is active"
    PEER_UNBOUND = "the other side is not bound yet"
    RATE = "over the slot's packet rate"
    PAUSED = "the pair went direct: the slot is paused"


@dataclass(slots=True)
class Side:
    node: Key
    port: int  # the relay port this node sends to
    bound: Address | None = None
    last_rx: float | None = None  # from the bound address
    asked_at: float | None = None  # the node asked for the slot again, until it next sends
    tokens: float = 0.0
    tokens_at: float = 0.0
    packets: int = 0  # forwarded from this side
    dropped: int = 0

    def take(self, now: float, limits: RelayLimits) -> bool:
        self.tokens = min(float(limits.packets_burst),
                          self.tokens + (now - self.tokens_at) * limits.packets_per_s)
        self.tokens_at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


@dataclass(slots=True)
class Slot:
    a: Side
    b: Side
    created: float
    last_active: float
    kernel: bool = False  # the kernel forwards this slot's flow (relaykernel.py)
    paused_at: float | None = None  # the pair went direct then; None: forwarding
    sides: dict[int, Side] = field(init=False)

    def __post_init__(self) -> None:
        self.sides = {self.a.port: self.a, self.b.port: self.b}

    @property
    def pair(self) -> tuple[Key, Key]:
        return self.a.node, self.b.node

    @property
    def bound(self) -> bool:
        return self.a.bound is not None and self.b.bound is not None

    def side_of(self, node: Key) -> Side:
        return self.a if node == self.a.node else self.b

    def let_move(self, node: Key, now: float) -> bool:
        """`node` asked for the slot again: its next datagram may move its side (the module
        doc); True when the side is bound."""
        side = self.side_of(node)
        side.asked_at = now
        return side.bound is not None

    def other(self, side: Side) -> Side:
        return self.b if side is self.a else self.a

    def receive(self, port: int, source: Address, data: bytes, now: float,
                observed: str | None, limits: RelayLimits, t: RelayTimings
                ) -> tuple[Verdict, Address | None]:
        """What to do with `data` from `source` on `port`: the verdict, and where to send it
        (out of the other side's port) when it is forwarded."""
        side = self.sides[port]
        kind = message_type(data)
        if kind is None:
            return self._drop(side, Verdict.NOT_WIREGUARD)
        if self.paused_at is not None:
            return self._drop(side, Verdict.PAUSED)
        verdict = Verdict.FORWARD
        if side.bound != source:
            if observed is None or source[0] != observed:
                return self._drop(side, Verdict.WRONG_SOURCE)
            asked = side.asked_at is not None and now - side.asked_at < t.rebind_quiet_s
            if side.bound is not None and not asked and (
                    kind is not MessageType.INITIATION or side.last_rx is None
                    or now - side.last_rx < t.rebind_quiet_s):
                return self._drop(side, Verdict.NEW_SOURCE)
            verdict = Verdict.BOUND if side.bound is None else Verdict.REBOUND
            side.bound = source
        side.asked_at = None  # it sent from where it is now bound
        side.last_rx = self.last_active = now
        if not side.take(now, limits):
            return self._drop(side, Verdict.RATE)
        destination = self.other(side).bound
        if destination is None:
            side.dropped += 1
            return (Verdict.PEER_UNBOUND if verdict is Verdict.FORWARD else verdict), None
        side.packets += 1
        return verdict, destination

    @staticmethod
    def _drop(side: Side, verdict: Verdict) -> tuple[Verdict, None]:
        side.dropped += 1
        return verdict, None


class SlotTable:
    """Every slot, by pair and by port. `ports` is the range the relay may use."""

    def __init__(self, ports: range, limits: RelayLimits | None = None) -> None:
        self.ports = ports
        self.limits = limits or RelayLimits()
        self._by_pair: dict[tuple[Key, Key], Slot] = {}
        self._by_port: dict[int, Slot] = {}
        self._free = list(reversed(ports))  # pop() hands out the lowest first

    def __len__(self) -> int:
        return len(self._by_pair)

    def __iter__(self) -> Iterator[Slot]:
        return iter(list(self._by_pair.values()))

    @property
    def free_ports(self) -> int:
        return len(self._free)

    def at_port(self, port: int) -> Slot | None:
        return self._by_port.get(port)

    def of_pair(self, a: Key, b: Key) -> Slot | None:
        return self._by_pair.get(pair_of(a, b))

    def allocate(self, a: Key, b: Key, now: float) -> tuple[Slot, bool]:
        """The pair's slot, made if it has none; True when it was made now."""
        if a == b:
            raise RequestRefused("relay: a node cannot relay to itself", 400)
        slot = self.of_pair(a, b)
        if slot is not None:
            return slot, False
        for node in (a, b):
            held = sum(1 for s in self._by_pair.values() if node in s.pair)
            if held >= self.limits.slots_per_node:
                raise RequestRefused(f"relay: {node} already holds {held} relay slots, the "
                                     "most a node may", 429)
        if len(self._free) < 2:
            raise RequestRefused("relay: no free relay ports", 503)
        first, second = pair_of(a, b)
        slot = Slot(Side(first, self._free.pop(), tokens=self.limits.packets_burst,
                         tokens_at=now),
                    Side(second, self._free.pop(), tokens=self.limits.packets_burst,
                         tokens_at=now),
                    created=now, last_active=now)
        self._by_pair[slot.pair] = slot
        for port in slot.sides:
            self._by_port[port] = slot
        return slot, True

    def release(self, slot: Slot) -> None:
        if self._by_pair.pop(slot.pair, None) is None:
            return
        for port in slot.sides:
            self._by_port.pop(port, None)
            self._free.append(port)

    def expired(self, now: float, t: RelayTimings) -> list[Slot]:
        """Slots to give back: never bound within bind_timeout_s, or idle for idle_timeout_s."""
        return [slot for slot in self
                if (not slot.bound and now - slot.created >= t.bind_timeout_s)
                or now - slot.last_active >= t.idle_timeout_s]


def port_range(text: str) -> range:
    """`FIRST-LAST` (inclusive): the relay's UDP ports, two per slot."""
    first, sep, last = text.partition("-")
    if not (sep and first.strip().isdigit() and last.strip().isdigit()):
        raise ConfigError(f"relay: port range {text!r}: expected FIRST-LAST, e.g. 31000-31999")
    ports = range(int(first), int(last) + 1)
    if not (ports.start >= 1 and ports.stop <= 65536 and len(ports) >= 2):
        raise ConfigError(f"relay: port range {text!r}: at least two ports, within 1-65535")
    return ports
