"""What this node's NAT does, measured with the registry's help (DESIGN.md §3, "Who
initiates"; the registry's side is registry/natprobe.py, the datagrams protocol/probewire.py).

From the WireGuard port, on the raw socket the openers use (natpunch/rawudp.py: the datagram
is built by hand because WireGuard owns the port; the replies are caught BPF-filtered), so the
NAT maps each probe exactly as it maps WireGuard's packets:
1. a request to the registry's probe port: the reply says which `ip:port` it saw. Compared
   with the endpoint the registry's WireGuard interface observes for us (same address, other
   port), it tells the *mapping*: the same outside port toward both ports is
   endpoint-independent, another one endpoint-dependent; an address of our own is no NAT.
2. a request asking for replies from the registry's second port and second address, which
   we never send to: the *filtering*. The one from the second port arriving means our NAT
   does not filter per port; the one from the second address, not per address either.

Address-dependent *mapping* (another outside port only toward another address; rare) is not
told apart from endpoint-independent: that needs a request to the second address, and a NAT
that filters per address then lets the second address in for minutes (conntrack's 120 s), so
the next measurement (a new endpoint, `netcheck` beside a running agent) would call it
endpoint-independent filtering. Repeatable beats complete here: filtering decides who needs
a relay (protocol/roles.py), and address-dependent mapping is endpoint-dependent anyway
toward every peer but the registry.

`Channel` is the one edge (send from the WireGuard port, collect replies), so the logic runs
in process against any fake; `classify` is pure.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..errors import MalformedPacket, WgpunchError
from ..natpunch.rawudp import RawUdp
from ..protocol.natinfo import UNKNOWN, NatBehaviour
from ..protocol.probewire import TXID_SIZE, Ask, Reply, Request, parse_reply
from ..wg.model import Endpoint, IPAddress

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ProbeTimings:
    # A reply on a working path takes a round trip to the registry; our choice, several
    # times a long one. A probe port that never answers costs tries * wait_s.
    wait_s: float = 0.3
    tries: int = 3
    # Waiting for replies that may never come (filtering): the same reasoning.
    alt_wait_s: float = 0.3
    alt_tries: int = 2
    # A probe port that did not answer is asked again after this, doubling up to the most:
    # a registry busy with many nodes starting at once (the 14-node lab on 2 cores) let every
    # try of a node go unanswered, and an unknown NAT leaves the initiator to key order.
    again_first_s: float = 1.0
    again_max_s: float = 60.0


class Channel(Protocol):
    async def exchange(self, listen_port: int, to: Endpoint, payload: bytes,
                       sources: Sequence[Endpoint], accept: Callable[[bytes], bool],
                       wait_s: float) -> dict[Endpoint, bytes]:
        """Send `payload` from our `listen_port` to `to`; within `wait_s`, the first datagram
        from each of `sources` that `accept`s, waiting at most `SETTLE_S` more for the others
        once `to`'s own came. Raises WgpunchError when it cannot send."""
        ...


# The registry sends all its replies to one request at once (registry/natprobe.py): once the
# one from the address we sent to came, the others come within a moment or not at all (our NAT
# filtered them). Our choice: well above the spread of replies sent together, and so a NAT
# that filters per port is measured in a round trip and this, not in every try's whole wait
# (0.6 s, the relay's decision waiting on it).
SETTLE_S = 0.05


class RawChannel:
    """The real channel: raw IPv4 sockets (CAP_NET_RAW), one BPF-filtered reader per source."""

    async def exchange(self, listen_port: int, to: Endpoint, payload: bytes,
                       sources: Sequence[Endpoint], accept: Callable[[bytes], bool],
                       wait_s: float) -> dict[Endpoint, bytes]:
        with contextlib.ExitStack() as stack:
            readers = {source: stack.enter_context(RawUdp(listen_port, source))
                       for source in sources}
            sender = readers.get(to) or stack.enter_context(RawUdp(listen_port, to))
            sender.send(payload)
            heard: dict[Endpoint, bytes] = {}
            loop = asyncio.get_running_loop()
            deadline = loop.time() + wait_s

            async def listen(source: Endpoint, reader: RawUdp) -> None:
                while (left := deadline - loop.time()) > 0:
                    data = await reader.recv(left)
                    if data is not None and accept(data):
                        heard[source] = data
                        return

            listeners = {source: asyncio.create_task(listen(source, reader))
                         for source, reader in readers.items()}
            try:
                own = listeners.get(to)
                if own is not None:
                    await asyncio.wait([own], timeout=wait_s)
                rest = [task for task in listeners.values() if not task.done()]
                if rest:
                    left = deadline - loop.time()
                    await asyncio.wait(rest, timeout=min(left, SETTLE_S) if to in heard
                                       else left)
            finally:
                for task in listeners.values():
                    task.cancel()
                results = await asyncio.gather(*listeners.values(), return_exceptions=True)
            for result in results:  # an error receiving, as the gather before raised it
                if isinstance(result, Exception) and not isinstance(
                        result, asyncio.CancelledError):
                    raise result
            # What arrived by now counts, read or not: on a busy machine the loop may run a
            # wait's timeout before the task a datagram woke (lab, 14 nodes on 2 cores: an
            # alternate's reply missed that way made a cone NAT look port-filtering).
            for source, reader in readers.items():
                late = None if source in heard else next(
                    (data for data in reader.queued() if accept(data)), None)
                if late is not None:
                    heard[source] = late
            return heard


@dataclass(frozen=True, slots=True)
class Measurement:
    """What one probe found, for `netcheck`; `behaviour` is what the node reports."""

    behaviour: NatBehaviour
    seen: Endpoint | None  # our WireGuard port as the probe port saw it
    wg_observed: Endpoint | None  # ... and as the registry's WireGuard interface saw it
    alt_port_heard: bool | None  # None: the registry has no second port (or see `settled`)
    alt_address_heard: bool | None  # None: the registry has no second address
    # False: the probe port answered the first request, not the filtering one: filtering is
    # unknown, and measured again as when nothing answered.
    settled: bool = True


def classify(listen_port: int, own: Collection[IPAddress], wg_observed: Endpoint | None,
             seen: Endpoint | None, alt_port_heard: bool | None,
             alt_address_heard: bool | None) -> NatBehaviour:
    """RFC 4787 terms from what the probes saw (the module docstring says which is which)."""
    if seen is None:
        return UNKNOWN
    if seen.ip in own:
        mapping = "none"
    elif wg_observed is None:
        mapping = "unknown"
    elif wg_observed != seen:
        mapping = "address-and-port-dependent"  # same registry address, another port
    else:
        mapping = "endpoint-independent"
    if alt_address_heard:
        filtering = "endpoint-independent"
    elif alt_port_heard:
        filtering = "not-port-dependent" if alt_address_heard is None else "address-dependent"
    elif alt_port_heard is False or alt_address_heard is False:
        filtering = "address-and-port-dependent"
    else:
        filtering = "unknown"
    preserved = seen.port == listen_port and (wg_observed is None
                                              or wg_observed.port == listen_port)
    return NatBehaviour(mapping, filtering, preserved)


async def _ask(channel: Channel, listen_port: int, to: Endpoint, ask: Ask,
               sources: Sequence[Endpoint], wait_s: float, tries: int) -> dict[Endpoint, Reply]:
    """One request (retried `tries` times, each with its own transaction id, until every
    source answered): the replies heard, per source."""
    heard: dict[Endpoint, Reply] = {}
    ours: set[bytes] = set()

    def accept(data: bytes) -> bool:
        try:
            return parse_reply(data).txid in ours
        except MalformedPacket:
            return False

    for _ in range(tries):
        request = Request(os.urandom(TXID_SIZE), ask)
        ours.add(request.txid)
        missing = [s for s in sources if s not in heard]
        got = await channel.exchange(listen_port, to, request.encode(), missing, accept, wait_s)
        heard.update({source: parse_reply(data) for source, data in got.items()})
        if len(heard) == len(sources):
            break
    return heard


async def measure(channel: Channel, listen_port: int, server: Endpoint,
                  wg_observed: Endpoint | None, own: Collection[IPAddress],
                  t: ProbeTimings | None = None) -> Measurement:
    """Probe the registry's probe port `server` from our WireGuard `listen_port`; `own`: our
    addresses. A probe that cannot be sent (no CAP_NET_RAW, IPv6) measures nothing."""
    t = t or ProbeTimings()
    try:
        first = (await _ask(channel, listen_port, server, Ask.NONE, [server], t.wait_s,
                            t.tries)).get(server)
        if first is None:
            log.debug("NAT probe: no answer from %s", server)
            return Measurement(UNKNOWN, None, wg_observed, None, None)
        alternates: dict[Ask, Endpoint] = {}
        if first.alt_port is not None:
            alternates[Ask.ALT_PORT] = Endpoint(server.ip, first.alt_port)
        if first.alt_address is not None:
            alternates[Ask.ALT_ADDRESS] = Endpoint(first.alt_address,
                                                   first.alt_port or server.port + 1)
        heard: set[Endpoint] | None = set()
        if alternates:
            ask = Ask.NONE
            for flag in alternates:
                ask |= flag
            heard = await _filtering(channel, listen_port, server, ask,
                                     list(alternates.values()), t)
    except WgpunchError as error:
        log.debug("NAT probe toward %s: %s", server, error)
        return Measurement(UNKNOWN, None, wg_observed, None, None)
    if heard is None:
        log.debug("NAT probe: %s did not answer the filtering request; filtering unknown",
                  server)
        alternates = {}  # nothing known of them: as a registry without them, measured again

    def was_heard(flag: Ask) -> bool | None:
        where = alternates.get(flag)
        return None if where is None or heard is None else where in heard

    alt_port_heard, alt_address_heard = was_heard(Ask.ALT_PORT), was_heard(Ask.ALT_ADDRESS)
    behaviour = classify(listen_port, own, wg_observed, first.observed, alt_port_heard,
                         alt_address_heard)
    return Measurement(behaviour, first.observed, wg_observed, alt_port_heard,
                       alt_address_heard, settled=heard is not None)


async def _filtering(channel: Channel, listen_port: int, server: Endpoint, ask: Ask,
                     alternates: Sequence[Endpoint], t: ProbeTimings) -> set[Endpoint] | None:
    """The alternates heard, judged only by tries whose probe-port reply came too: the
    registry sends them all at once, so one missing beside it was filtered by our NAT. None:
    no try's probe-port reply came (a registry too busy to answer in time, as 14 nodes
    starting on 2 cores made it), and a missing alternate says nothing: calling that
    filtering per port made cone x symmetric pairs relayed for good."""
    heard: set[Endpoint] = set()
    answered = False
    for _ in range(t.alt_tries):
        got = await _ask(channel, listen_port, server, ask, [server, *alternates],
                         t.alt_wait_s, 1)
        heard |= set(got) - {server}
        answered = answered or server in got
        if answered and heard >= set(alternates):
            break
    return heard if answered else None


class NatWatch:
    """The agent's NAT behaviour, measured again whenever the endpoint the registry observes
    for us changes (a new mapping may behave otherwise: roaming, a NAT that rebooted)."""

    def __init__(self, channel: Channel, server: Endpoint, t: ProbeTimings | None = None
                 ) -> None:
        self.channel = channel
        self.server = server
        self.t = t or ProbeTimings()
        self.measured: Measurement | None = None
        self._again_s: float | None = None  # while the probe port has not answered

    def again_in(self) -> float | None:
        """Seconds until the next try when the probe port has not answered yet, else None."""
        return self._again_s

    async def current(self, listen_port: int, wg_observed: Endpoint | None,
                      own: Collection[IPAddress], *, again: bool = False) -> NatBehaviour:
        """The behaviour for our mapping `wg_observed`: measured once per mapping, or anew
        with `again` (after `again_in()`, while the probe port has not answered)."""
        last = self.measured
        if last is None or last.wg_observed != wg_observed or again:
            previous = last
            last = await measure(self.channel, listen_port, self.server, wg_observed, own,
                                 self.t)
            if (again and previous is not None and previous.wg_observed == wg_observed
                    and _knows_less(last, previous)):
                # A try again that the busy registry answered less of than the last one
                # tells nothing new about the same mapping: keep what is known.
                last = previous
            self.measured = last
            # A try again that finds what the last one found is not news.
            log.log(logging.DEBUG if again and previous == last else logging.INFO,
                    "NAT: %s (probe port %s saw %s; the registry's WireGuard port %s)",
                    last.behaviour.words(), self.server, last.seen, wg_observed,
                    extra={"event": "nat_measured", **last.behaviour.to_json()})
            if last.seen is not None and last.settled:
                self._again_s = None
            else:
                self._again_s = (self.t.again_first_s if self._again_s is None
                                 else min(2 * self._again_s, self.t.again_max_s))
        return last.behaviour


def _knows_less(new: Measurement, old: Measurement) -> bool:
    return (new.seen is None and old.seen is not None) or (
        not new.settled and old.settled)


def own_addresses(addresses: Iterable[IPAddress]) -> frozenset[IPAddress]:
    """Our addresses as the probe compares them (an IPv4-mapped one is its IPv4 address)."""
    return frozenset(a.ipv4_mapped if isinstance(a, ipaddress.IPv6Address)
                     and a.ipv4_mapped is not None else a for a in addresses)
