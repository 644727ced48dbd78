"""The relay: UDP sockets for the slots (relayslots.py) and the datagrams between them, plus
the kernel fast path (relaykernel.py) once a slot's both sides are bound (DESIGN.md §6).

It runs beside the registry in its process (`wgpunch registry --relay`), or alone
(`wgpunch relay`); who may have a slot, and between whom, is the caller's business (the
registry's API): this only forwards, and only what relayslots.py lets through.

Userspace forwarding reads each slot port's socket straight from the event loop's reader
callback, draining up to `BATCH` datagrams per wake-up and sending each on at once out of the
other port's socket: no task, no future and no queue per datagram, and socket buffers of
several MiB to ride out the loop's other work. A datagram the kernel cannot take at once
(a full send buffer) is dropped, as a router would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import RelayError, RequestRefused
from ..keys import Key
from .metrics import RelayCounts
from .relaykernel import Flow, KernelPath
from .relayslots import Address, RelayLimits, RelayTimings, Slot, SlotTable, Verdict

log = logging.getLogger(__name__)

# Our choice: enough to drain a burst without holding the loop long (64 x ~2 us).
BATCH = 64
# Socket buffers: a few ms at 1 Gbit/s, so a busy loop drops nothing (net.core.rmem_max caps
# SO_RCVBUF; root gets the size with SO_RCVBUFFORCE).
BUFFER_BYTES = 4 * 1024 * 1024
MAX_DATAGRAM = 65535
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # Linux <asm-generic/socket.h>; not in `socket`
# Datagrams of a bound flow the kernel dropped over the slot's rate (relaykernel.py), counted
# beside the userspace verdicts as of the last counter read.
KERNEL_RATE = f"{Verdict.RATE} (kernel path)"
# Why a datagram was not forwarded, as the metrics name it (docs/metrics.md).
DROPPED = {Verdict.NOT_WIREGUARD: "shape", Verdict.WRONG_SOURCE: "source",
           Verdict.NEW_SOURCE: "new_source", Verdict.PEER_UNBOUND: "unbound",
           Verdict.RATE: "rate", KERNEL_RATE: "rate", Verdict.PAUSED: "paused",
           "send buffer full": "send_buffer"}


@dataclass(frozen=True, slots=True)
class Lease:
    """A slot as one of its nodes sees it: the relay port it sends to, for `peer`."""

    peer: Key
    port: int
    created: bool  # the slot was made by this request


class Relay:
    def __init__(
        self,
        observed: Callable[[Key], str | None],
        *,
        ports: range,
        host: str = "0.0.0.0",
        limits: RelayLimits | None = None,
        timings: RelayTimings | None = None,
        kernel: KernelPath | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`observed(node)`: the node's public IP as the registry observes it (text), or None.
        `kernel`: the fast path to use once both sides are bound; None: userspace only."""
        self.observed = observed
        self.host = host
        self.table = SlotTable(ports, limits)
        self.t = timings or RelayTimings()
        self.kernel = kernel
        self.clock = clock
        self.counts: dict[str, int] = {}  # datagrams by verdict, for logs and tests
        self._sockets: dict[int, socket.socket] = {}
        self._kernel_dirty = asyncio.Event()
        self._kernel_packets: dict[int, tuple[int, int]] = {}  # by side port, as last read
        self._kernel_generation = 0  # the table's, at that read
        self._kernel_rate_dropped: dict[int, int] = {}  # likewise, over the slot's rate
        # Forwarded since start, by path: [datagrams, bytes].
        self._forwarded = {"userspace": [0, 0], "kernel": [0, 0]}
        self._bound_unsent = 0  # datagrams that bound a side while the other was unbound
        self._tasks: list[asyncio.Task[None]] = []

    # -- life -------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.kernel is not None:
            await self.kernel.reset()
            self._tasks.append(asyncio.create_task(self._kernel_sync(), name="relay-kernel"))
            self._tasks.append(asyncio.create_task(self._kernel_poll(), name="relay-counters"))
        self._tasks.append(asyncio.create_task(self._sweep(), name="relay-sweep"))
        log.info("relay: ports %d-%d, %s path", self.table.ports.start,
                 self.table.ports.stop - 1, "kernel" if self.kernel else "userspace",
                 extra={"event": "relay_serving", "kernel": self.kernel is not None})

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for slot in self.table:
            self._release(slot)
        if self.kernel is not None:
            with contextlib.suppress(RelayError):
                await self.kernel.close()
        log.info("relay stopped: %s", ", ".join(f"{k} {v}" for k, v in self.counts.items())
                 or "no datagrams", extra={"event": "relay_stopped", "counts": self.counts})

    # -- slots (plain def: nothing interleaves) ---------------------------------------------

    def allocate(self, node: Key, peer: Key) -> tuple[Lease, Lease]:
        """The pair's slot, made with its two sockets if it has none: `node`'s lease, then
        `peer`'s. A node that asks for a slot it holds has lost its path through it: its next
        datagram may move its side (relayslots.py)."""
        now = self.clock()
        slot, created = self.table.allocate(node, peer, now)
        if created:
            try:
                for port in slot.sides:
                    self._open(port)
            except OSError as error:
                self._release(slot)
                raise RequestRefused(f"relay: cannot open a relay port: {error.strerror}",
                                     503) from None
            log.info("relay slot for %s (port %d) <-> %s (port %d)", slot.a.node, slot.a.port,
                     slot.b.node, slot.b.port,
                     extra={"event": "relay_slot", "peer": str(slot.a.node),
                            "target": str(slot.b.node)})
        else:
            if slot.paused_at is not None:  # the pair's direct path failed (node/upgrade.py)
                slot.paused_at = None
                log.info("relay slot %d/%d: %s asked again; forwarding again", slot.a.port,
                         slot.b.port, node, extra={"event": "relay_resumed", "peer": str(node)})
                self._kernel_dirty.set()
            if slot.let_move(node, now):
                log.info("relay slot %d: %s asked again; its next datagram may move it",
                         slot.side_of(node).port, node,
                         extra={"event": "relay_unbound", "peer": str(node)})
        mine, theirs = slot.side_of(node), slot.side_of(peer)
        return Lease(peer, mine.port, created), Lease(node, theirs.port, created)

    def leases_of(self, node: Key) -> list[Lease]:
        """`node`'s lease of each slot it holds and uses (a paused pair went direct)."""
        return [Lease(slot.other(side).node, side.port, False) for slot in self.table
                if slot.paused_at is None for side in (slot.a, slot.b) if side.node == node]

    def pause(self, node: Key, peer: Key) -> bool:
        """The pair went direct: its slot (if any) forwards nothing from now on, in userspace
        at once, in the kernel once the table is rewritten (a few ms). Whether the switch
        goes ahead: False when the slot was paused already within `direct_coalesce_s` (both
        sides' probes were answered); True without a slot (it expired: nothing to stop)."""
        slot = self.table.of_pair(node, peer)
        now = self.clock()
        if slot is None or (slot.paused_at is not None
                            and now - slot.paused_at < self.t.direct_coalesce_s):
            return slot is None
        slot.paused_at = now
        log.info("relay slot %d/%d: %s and %s went direct; paused", slot.a.port, slot.b.port,
                 slot.a.node, slot.b.node,
                 extra={"event": "relay_paused", "peer": str(node), "target": str(peer)})
        if slot.kernel:
            self._kernel_dirty.set()
        return True

    def end(self, slot: Slot, why: str) -> None:
        log.info("relay slot %d/%d ended: %s (%d and %d datagrams forwarded)", slot.a.port,
                 slot.b.port, why, slot.a.packets, slot.b.packets,
                 extra={"event": "relay_slot_ended", "peer": str(slot.a.node),
                        "target": str(slot.b.node)})
        self._release(slot)

    def _release(self, slot: Slot) -> None:
        for port in slot.sides:
            sock = self._sockets.pop(port, None)
            if sock is not None:
                asyncio.get_running_loop().remove_reader(sock.fileno())
                sock.close()
        self.table.release(slot)
        if slot.kernel:
            self._kernel_dirty.set()

    def _open(self, port: int) -> None:
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET,
                             socket.SOCK_DGRAM)
        try:
            for option, force in ((socket.SO_RCVBUF, SO_RCVBUFFORCE),
                                  (socket.SO_SNDBUF, SO_SNDBUFFORCE)):
                try:  # the FORCE variants: past net.core.rmem_max, with CAP_NET_ADMIN
                    sock.setsockopt(socket.SOL_SOCKET, force, BUFFER_BYTES)
                except OSError:
                    sock.setsockopt(socket.SOL_SOCKET, option, BUFFER_BYTES)
            sock.setblocking(False)
            sock.bind((self.host, port))
        except OSError:
            sock.close()
            raise
        self._sockets[port] = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable, sock, port)

    # -- datagrams --------------------------------------------------------------------------

    def _readable(self, sock: socket.socket, port: int) -> None:
        slot = self.table.at_port(port)
        if slot is None:
            return
        now = self.clock()
        for _ in range(BATCH):
            try:
                data, source = sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # an ICMP error queued on the socket: nothing to forward
                continue
            self._datagram(slot, port, source[:2], data, now)

    def _datagram(self, slot: Slot, port: int, source: Address, data: bytes, now: float) -> None:
        side = slot.sides[port]
        verdict, destination = slot.receive(
            port, source, data, now, self.observed(side.node), self.table.limits, self.t)
        self.counts[verdict] = self.counts.get(verdict, 0) + 1
        if verdict in (Verdict.BOUND, Verdict.REBOUND):
            log.info("relay slot %d: %s %s at %s:%d", port, side.node, verdict, *source,
                     extra={"event": "relay_bound", "peer": str(side.node)})
            if slot.bound and self.kernel is not None:
                self._kernel_dirty.set()
        if destination is None:
            if verdict in (Verdict.BOUND, Verdict.REBOUND):  # bound its side, goes nowhere
                self._bound_unsent += 1
            return
        try:
            self._sockets[slot.other(side).port].sendto(data, destination)
            total = self._forwarded["userspace"]
            total[0] += 1
            total[1] += len(data)
        except (BlockingIOError, InterruptedError):
            self.counts["send buffer full"] = self.counts.get("send buffer full", 0) + 1
        except OSError as error:
            log.debug("relay slot %d: sending to %s failed: %s", port, destination, error)

    # -- background -------------------------------------------------------------------------

    async def _kernel_sync(self) -> None:
        """Keep the kernel's table equal to the bound IPv4 slots."""
        assert self.kernel is not None
        while True:
            await self._kernel_dirty.wait()
            self._kernel_dirty.clear()
            flows = {}
            for slot in self.table:
                a, b = slot.a.bound, slot.b.bound
                if (a is not None and b is not None and ":" not in a[0] + b[0]
                        and slot.paused_at is None):
                    flows[slot.a.port] = Flow(slot.a.port, a, slot.b.port, b)
            try:
                await self.kernel.apply(flows)
            except RelayError as error:
                log.warning("%s; forwarding in userspace from now on", error,
                            extra={"event": "relay_kernel_failed"})
                kernel, self.kernel = self.kernel, None
                with contextlib.suppress(RelayError):  # no rule of ours may outlive this
                    await kernel.close()
                for slot in self.table:
                    slot.kernel = False
                return
            for slot in self.table:
                if slot.kernel != (slot.a.port in flows):
                    slot.kernel = slot.a.port in flows
                    log.info("relay slot %d/%d: %s", slot.a.port, slot.b.port,
                             "the kernel forwards" if slot.kernel else "back in userspace",
                             extra={"event": "relay_kernel", "kernel": slot.kernel})

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.t.sweep_s)
            self.sweep_once()

    def sweep_once(self) -> None:
        """End the slots that expired."""
        for slot in self.table.expired(self.clock(), self.t):
            self.end(slot, "idle" if slot.bound else "never bound")

    async def _kernel_poll(self) -> None:
        while True:
            await asyncio.sleep(self.t.kernel_poll_s)
            if self.kernel is not None and any(slot.kernel for slot in self.table):
                await self.kernel_activity()

    async def kernel_activity(self) -> None:
        """Take what the kernel forwarded into the slots: a side whose counter moved since
        the last read sent just now, as if the relay had seen its datagram."""
        assert self.kernel is not None
        try:
            counters = await self.kernel.counters()
        except RelayError as error:
            log.debug("%s", error)
            return
        if self.kernel.generation != self._kernel_generation:  # rewritten: counters from 0
            self._kernel_packets, self._kernel_generation = {}, self.kernel.generation
            self._kernel_rate_dropped = {}
        for port, read in self.kernel.rate_dropped.items():
            dropped = max(0, read - self._kernel_rate_dropped.get(port, 0))
            if dropped:
                self.counts[KERNEL_RATE] = self.counts.get(KERNEL_RATE, 0) + dropped
        self._kernel_rate_dropped = dict(self.kernel.rate_dropped)
        now, total = self.clock(), self._forwarded["kernel"]
        for slot in self.table:
            for side in (slot.a, slot.b):
                count = counters.get(side.port)
                if not slot.kernel or count is None or count == self._kernel_packets.get(
                        side.port):
                    continue
                side.last_rx = slot.last_active = now
                before = self._kernel_packets.get(side.port, (0, 0))
                # max: a read that raced a rewrite may see the old table's counts.
                total[0] += max(0, count[0] - before[0])
                total[1] += max(0, count[1] - before[1])
        self._kernel_packets = counters

    def metrics_counts(self) -> RelayCounts:
        """What a metrics scrape shows (registry/metrics.py); the kernel's share as of the
        last counter read (every kernel_poll_s)."""
        dropped: dict[str, int] = {}
        for verdict, count in self.counts.items():
            if verdict in DROPPED:
                dropped[DROPPED[verdict]] = dropped.get(DROPPED[verdict], 0) + count
        if self._bound_unsent:
            dropped["unbound"] = dropped.get("unbound", 0) + self._bound_unsent
        return RelayCounts(
            slots=len(self.table), kernel_slots=sum(slot.kernel for slot in self.table),
            packets={path: total[0] for path, total in self._forwarded.items()},
            bytes={path: total[1] for path, total in self._forwarded.items()},
            dropped=dropped)
