"""The observer: reads the registry's own WireGuard device and feeds the peer table.

The registry's interface is every node's ordinary peer, so the endpoint it shows for a peer is
that node's public (post-NAT) address. Reading it every `poll_interval_s` keeps the table
current; the table publishes only what changed. Each read asks the device only for what
changed since the previous one (`Device.changes`), so a poll of a large device that changed
little costs the event loop little: 10,000 peers, ~10 ms of CPU in steps under a millisecond,
against ~0.3 s for parsing and comparing everything (bench/dns.py). A failed read is logged
(throttled) and retried, never fatal: the API keeps serving the last table. After a failure
the device is opened afresh, and its first read is taken as the whole table, so a
wireguard-go that was restarted (or started after us) is found again.

The pace: every `poll_interval_s` while nothing changes, four times as often for a few
seconds after a read found a change or after `nudge()` (the API calls it when a node reports
something new or asks for a punch: its endpoint may have moved with it), so that the changes
that come together are seen quickly and a quiet device costs no more than before
(timings.py); but never so often that reads take more than QUICK_READ_SHARE of the time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from ..errors import WgpunchError
from ..throttle import Throttle
from ..wg import Device
from .metrics import RegistryMetrics
from .state import RegistryState
from .timings import Timings

log = logging.getLogger(__name__)

# Changed peers applied to the table per turn of the event loop: ~0.3 ms (state.py).
APPLY_SLICE = 200
# The quick pace is never so quick that reads take more than this share of the time: at
# 1,000 peers a read takes a few ms and the quick pace holds; at 10,000 (~40 ms, bench/dns.py)
# it stays near the slow one.
QUICK_READ_SHARE = 0.25


class Observer:
    def __init__(
        self,
        opener: Callable[[], Device],
        state: RegistryState,
        timings: Timings,
        *,
        clock: Callable[[], float] = time.monotonic,
        metrics: RegistryMetrics | None = None,
    ) -> None:
        self._opener = opener
        self._metrics = metrics or RegistryMetrics()
        self._state = state
        self._timings = timings
        self._clock = clock
        self._device: Device | None = None
        self._throttle = Throttle(timings.device_error_log_s)
        self._fast_until = float("-inf")  # on the clock: the quick pace lasts until then
        self._nudged = asyncio.Event()
        self.failures = 0  # consecutive failed reads
        self.reads = 0  # successful reads since start

    def nudge(self) -> None:
        """Read soon (at the quick pace after the last read), and quickly for a while."""
        self._fast_until = self._clock() + self._timings.poll_fast_for_s
        self._nudged.set()

    def interval(self, took: float = 0.0) -> float:
        """The time between the starts of two reads now, after a read that took `took`:
        `poll_interval_s`, but for `poll_fast_for_s` after a change or a nudge
        `poll_fast_factor` of it, or as long as keeps reads to QUICK_READ_SHARE of the
        time."""
        t = self._timings
        if self._clock() >= self._fast_until:
            return t.poll_interval_s
        return min(t.poll_interval_s,
                   max(t.poll_interval_s * t.poll_fast_factor, took / QUICK_READ_SHARE))

    async def poll_once(self) -> bool:
        """Read the device once and update the table; False if the read failed."""
        try:
            if self._device is None:
                self._device = self._opener()
            read = await self._device.changes()
        except Exception as error:  # any failure is retried, none is fatal
            self._failed(error)
            await self._drop_device()
            return False
        if self.failures:
            held = self._throttle.reset("read")
            log.info("device %s readable again after %d failed reads (%d not logged)",
                     read.name, self.failures, held, extra={"event": "device_recovered"})
            self.failures = 0
        self.reads += 1
        self._state.observe_device(read.public_key, read.listen_port)
        if read.complete:  # a freshly opened device: its first read is the whole table
            self._state.observe(read.changed)
            return True
        # In slices, with the event loop running between them: at 10,000 nodes ~1,000 peers'
        # counters move per poll, ~1.5 ms of table updates in one go. Each slice is a change
        # of its own (the table's guarantees hold per call); the read was never one instant.
        changed = bool(self._state.observe_changes((), read.removed))
        for start in range(0, len(read.changed), APPLY_SLICE):
            await asyncio.sleep(0)
            changed |= bool(self._state.observe_changes(read.changed[start:start + APPLY_SLICE],
                                                        ()))
        if changed:  # moved counters and handshake times alone keep the slow pace
            self._fast_until = self._clock() + self._timings.poll_fast_for_s
        return True

    async def run(self) -> None:
        """Poll until cancelled, one read per `interval()`; but after a read that took longer
        than the interval, pause as long as it took, so that a device too large to read
        within the interval leaves the API and DNS at least half the time. (10,000 peers
        read in ~40 ms, most of it wireguard-go writing its reply: bench/dns.py.)"""
        while True:
            started = self._clock()
            ok = await self.poll_once()
            took = self._clock() - started
            self._metrics.observer_poll(took, ok)
            await self._rest(started, took)

    async def _rest(self, started: float, took: float) -> None:
        """Until the next read is due; a nudge meanwhile brings it forward to the quick
        pace."""
        while True:
            self._nudged.clear()  # interval() counts every nudge so far
            interval = self.interval(took)
            left = started + max(interval, took + min(took, 10 * interval)) - self._clock()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._nudged.wait()

    async def close(self) -> None:
        await self._drop_device()

    def _failed(self, error: BaseException) -> None:
        self.failures += 1
        held = self._throttle.allow("read", self._clock())
        if held is None:
            return
        suffix = f" ({held} more failures not logged)" if held else ""
        if isinstance(error, WgpunchError | OSError):
            log.warning("cannot read the device, serving the last table: %s%s", error, suffix,
                        extra={"event": "device_error"})
        else:
            log.error("unexpected error reading the device, serving the last table%s", suffix,
                      exc_info=error, extra={"event": "device_error"})

    async def _drop_device(self) -> None:
        device, self._device = self._device, None
        if device is not None:
            with contextlib.suppress(Exception):
                await device.close()
