"""Which relay holds a pair's slot: the registry's own (relay.py, `--relay`) or one on another
host (relayremote.py, `--relay-remote`), so that relays scale out (DESIGN.md §6).

A pair asks the relay that holds its slot (asking again lets the asker's side there move, as
on one relay); a new pair gets the least loaded remote relay that answers, else the local
one, else, as a last resort, a remote relay that did not answer last time. A relay that
fails a request is marked unhealthy and the next one is asked, within the same request.
Every `refresh_s` each remote relay is asked for its slots: that tells whether it answers,
its load, and where pairs are relayed, also after a restart of the registry (the remote
relays keep their slots, so relayed pairs keep working through it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

from ..errors import RelayError, RequestRefused
from ..keys import Key
from ..protocol import pair_of
from ..wg.model import IPAddress
from .relay import Relay
from .relayremote import RemoteRelay

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PoolTimings:
    # How often each remote relay's slots are read. Our choice: a relay that went away is
    # skipped for new pairs within this long (a request to it fails over at once anyway),
    # and the read costs the relay little (a list of its slots).
    refresh_s: float = 5.0


@dataclass(frozen=True, slots=True)
class Grant:
    """A slot as the asker sees it: its port, its peer's, the relay's address (None: the
    registry's own endpoint address, as each node's device has it)."""

    mine: int
    theirs: int
    address: IPAddress | None
    created: bool


class LocalRelay:
    """The registry's own relay, asked as a remote one is."""

    healthy = True

    def __init__(self, relay: Relay, address: IPAddress | None) -> None:
        self.relay = relay
        self.address = address

    def __str__(self) -> str:
        return "the registry's own relay"

    @property
    def load(self) -> int:
        return len(self.relay.table)

    def port_of(self, node: Key, pair: tuple[Key, Key]) -> int | None:
        slot = self.relay.table.of_pair(*pair)
        return None if slot is None else slot.side_of(node).port

    async def allocate(self, _session: aiohttp.ClientSession | None, node: Key, _node_ip: str,
                       peer: Key, _peer_ip: str) -> tuple[int, int, bool]:
        # The local relay reads the observed IPs itself, at each datagram (relayroute.py).
        mine, theirs = self.relay.allocate(node, peer)
        return mine.port, theirs.port, mine.created

    async def pause(self, _session: aiohttp.ClientSession | None, node: Key, peer: Key) -> bool:
        return self.relay.pause(node, peer)


Host = LocalRelay | RemoteRelay


class RelayPool:
    def __init__(self, local: Relay | None, local_address: IPAddress | None,
                 remotes: Sequence[RemoteRelay] = (), t: PoolTimings | None = None) -> None:
        self.local = None if local is None else LocalRelay(local, local_address)
        self.remotes = list(remotes)
        self.t = t or PoolTimings()
        self.placed: dict[tuple[Key, Key], Host] = {}  # where each pair last asked
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    # -- life -------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.local is not None:
            await self.local.relay.start()
        if self.remotes:
            self._session = aiohttp.ClientSession()
            await self.refresh()
            self._task = asyncio.create_task(self._refresh_forever(), name="relay-pool")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()
        if self.local is not None:
            await self.local.relay.close()

    async def refresh(self) -> None:
        """Read every remote relay's slots; log the ones that stopped or started answering."""
        assert self._session is not None
        was = {relay: relay.healthy for relay in self.remotes}
        await asyncio.gather(*(relay.refresh(self._session) for relay in self.remotes))
        for relay in self.remotes:
            if relay.healthy != was[relay]:
                log.log(logging.INFO if relay.healthy else logging.WARNING, "%s %s", relay,
                        "answers again" if relay.healthy else f"is not used: {relay.error}",
                        extra={"event": "relay_remote", "healthy": relay.healthy})

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.t.refresh_s)
            await self.refresh()

    # -- choosing (plain def: nothing interleaves) --------------------------------------------

    def holder(self, pair: tuple[Key, Key]) -> Host | None:
        """The relay that holds the pair's slot, if any: where it last asked, else the first
        that lists it (after a restart of the registry)."""
        placed = self.placed.get(pair)
        if placed is not None and placed.port_of(pair[0], pair) is not None:
            return placed
        return next((host for host in self._hosts() if host.port_of(pair[0], pair) is not None),
                    None)

    def choices(self, pair: tuple[Key, Key]) -> list[Host]:
        """The relays to ask for the pair's slot, in turn."""
        answering = sorted((r for r in self.remotes if r.healthy), key=lambda r: len(r.slots))
        order: list[Host] = [*answering, *([self.local] if self.local else []),
                             *(r for r in self.remotes if not r.healthy)]
        held = self.placed.get(pair) or self.holder(pair)
        if held is not None and held.healthy:
            order.remove(held)
            order.insert(0, held)
        return order

    def standing(self, node: Key) -> list[tuple[Key, int, IPAddress | None]]:
        """Each slot `node` holds: its peer, the port its device sends to, the address."""
        pairs = {pair for host in self.remotes for pair in host.slots
                 if node in pair and pair not in host.paused}
        if self.local is not None:
            pairs |= {pair_of(node, lease.peer) for lease in self.local.relay.leases_of(node)}
        found = []
        for pair in sorted(pairs, key=lambda p: (p[0].raw, p[1].raw)):
            host = self.holder(pair)
            port = None if host is None else host.port_of(node, pair)
            if host is not None and port is not None:
                found.append((pair[1] if pair[0] == node else pair[0], port, host.address))
        return found

    # -- asking -------------------------------------------------------------------------------

    async def allocate(self, node: Key, node_ip: str, peer: Key, peer_ip: str) -> Grant:
        """The pair's slot on the relay that holds it or, failing that, the next choice."""
        pair = pair_of(node, peer)
        failures: list[str] = []
        refused: RequestRefused | None = None
        for host in self.choices(pair):
            # Before the request: the other side, asking meanwhile, goes to the same relay.
            self.placed[pair] = host
            try:
                mine, theirs, created = await host.allocate(self._session, node, node_ip, peer,
                                                            peer_ip)
            except RelayError as error:
                failures.append(str(error))
                log.warning("%s; asking the next relay", error,
                            extra={"event": "relay_remote_failed"})
                continue
            except RequestRefused as error:  # the local relay: no ports, or a node's limit
                refused = error
                failures.append(f"{host}: {error}")
                continue
            if created and self.remotes:
                log.info("relay slot for %s <-> %s on %s", node, peer, host,
                         extra={"event": "relay_placed", "peer": str(node),
                                "target": str(peer)})
            return Grant(mine, theirs, host.address, created)
        self.placed.pop(pair, None)
        if refused is not None and len(failures) == 1:
            raise refused
        raise RequestRefused(f"relay: no relay gave a slot: {'; '.join(failures)}", 503)

    async def pause(self, node: Key, peer: Key) -> bool:
        """The pair went direct: its slot, wherever it is, stops forwarding. Whether the
        switch goes ahead (Relay.pause); a relay that does not answer does not stop it (the
        nodes keep the direct endpoint themselves, node/upgrade.py)."""
        pair = pair_of(node, peer)
        host = self.holder(pair)
        if host is None:
            return True
        try:
            return await host.pause(self._session, node, peer)
        except RelayError as error:
            log.warning("%s; the pair goes direct all the same", error,
                        extra={"event": "relay_remote_failed"})
            return True

    def _hosts(self) -> list[Host]:
        return [*self.remotes, *([self.local] if self.local else [])]
