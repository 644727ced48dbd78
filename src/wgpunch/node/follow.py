"""The node agent's tasks toward the registry: the one that follows its watch stream into the
agent's view (`follow_registry`, view.py), the one that measures our NAT when the registry sees
us anew (`measure_nat`) and the one that reports this node (`report_self`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from .. import __version__
from ..errors import ApiError, DeviceError, MalformedMessage
from ..protocol import (
    Event,
    Reported,
)
from ..wg.device import Device
from .addresses import ipv6_endpoints
from .edges import Clock, Io
from .natprobe import NatWatch, own_addresses
from .pace import SHARED_READ_S
from .source import Source
from .view import RegistryView

log = logging.getLogger("wgpunch.node.agent")  # one logger for the agent, whichever module


@dataclass(frozen=True, slots=True)
class RegistryTimings:
    # A watch stream that failed is opened again after this long, doubled per failure (each
    # pause jittered by +-20 %, so that nodes do not reconnect in step), and back to the first
    # once a stream delivered again. Up to reconnect_fast_max_s while the registry has been
    # away for less than fast_for_s, so that a registry restarted at once (an upgrade, a
    # crash under systemd's Restart=) has its nodes back within about a second; then up to
    # reconnect_max_s, so that a registry gone for good is not asked every second by every
    # node. Our choices (before: up to 30 s at once, nodes followed a registry restarted
    # after 15 s 11.7-12.3 s after it served again; with 1 s here, p50 0.80 p95 0.98 s,
    # bench/time_to_direct.py registry-restart; goal 1 s). A node then connects twice a
    # second at most: a refused SYN, to a registry that is away.
    reconnect_first_s: float = 0.1
    reconnect_fast_max_s: float = 0.5
    fast_for_s: float = 60.0
    reconnect_max_s: float = 30.0
    # A registry away for less than this is a blip, logged at DEBUG; past it, each distinct
    # failure is one warning. Our choice: a restart of the registry's process takes about this.
    warn_after_s: float = 1.0
    # Re-report our candidates this often: addresses change (DHCP, roaming).
    report_every_s: float = 60.0
    # A report that failed is tried again this soon.
    report_retry_s: float = 2.0


async def follow_registry(client: Source, view: RegistryView, t: RegistryTimings,
                          on_silence: Callable[[], Awaitable[None]], clock: Clock) -> None:
    """Follow `client`'s watch stream into `view`, forever, reconnecting with backoff from
    where it left off; `on_silence` runs whenever a stream that had worked ends."""
    delay = t.reconnect_first_s
    view.set_health(client.following, "connecting", clock.wall())
    lost_at = clock.monotonic()  # when we last stopped hearing from it
    warned: str | None = None  # the failure last logged as a warning, until it works again
    while True:
        heard = False
        view.relink.clear()
        try:
            async for event in until_set(client.watch(view.revision, view.epoch),
                                          view.relink):
                if not heard:
                    view.connections += 1
                    log.info("%s", client.following, extra={"event": "registry_connected"})
                    view.set_health(client.following, "following", clock.wall())
                delay, heard, warned = t.reconnect_first_s, True, None
                lost_at = clock.monotonic()
                view.apply(event)
                view.stream_open.set()
        except ApiError as error:
            # A blip (the first quick retries) is no warning, nor is the same failure again
            # (retries come every second for a while): `status` says how long it has lasted.
            loud = clock.monotonic() - lost_at >= t.warn_after_s and str(error) != warned
            log.log(logging.WARNING if loud else logging.DEBUG, "%s", error)
            warned = str(error) if loud else warned
            never = not heard and view.health is not None and view.health.state == "connecting"
            view.set_health(client.following, "connecting" if never else "unreachable",
                            clock.wall(), str(error))
            view.wake.set()  # the agent publishes the change
        if heard:
            # A stream that worked and went silent: our own NAT may have lost its state
            # (reboot, flush), which blocks every peer's packets to us as well. Sending
            # is what reopens it.
            await on_silence()
        if view.relink.is_set():
            delay = t.reconnect_first_s
            continue
        await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # backoff, not sync
        away_s = clock.monotonic() - lost_at
        delay = min(delay * 2, t.reconnect_fast_max_s if away_s < t.fast_for_s
                    else t.reconnect_max_s)


async def measure_nat(view: RegistryView, nat: NatWatch, device: Device, io: Io,
                      observer: RegistryView | None = None) -> None:
    """Measure our NAT (node/natprobe.py) whenever the registry observes a new endpoint for
    us, and have the report carry the result. `observer`: the view of the registry the NAT
    is measured toward, when that is not `view` (several registries, registries.py: each
    may see another of our NAT's ports). Beside the report, not before it: the filtering
    test waits for replies that may never come (0.6 s behind most NATs), and the registry
    observes our endpoint only after our first handshake with it (about a second into a lab
    run), so waiting for both would delay every first punch by a second or more (bench
    easy: p50 1.46 s, against 0.05 s). Until the measurement is in, the registry decides who
    initiates without it, as for a node older than the measurement."""
    while True:
        again_in = nat.again_in()
        seen = observer or view
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(again_in):
                await seen.observed_changed.wait()
        again = not seen.observed_changed.is_set()
        seen.observed_changed.clear()
        observed = seen.own_endpoint()
        if observed is None:
            continue
        try:
            state = await device.state()
            interfaces = await io.local_addresses(device.name)
        except DeviceError as error:
            log.debug("NAT measurement skipped: %s", error)
            continue
        before = nat.measured
        await nat.current(state.listen_port, observed, own_addresses(i.ip for i in interfaces),
                          again=again)
        if nat.measured is not before:
            view.reported.set()


async def until_set(stream: AsyncIterator[Event], stop: asyncio.Event
                    ) -> AsyncIterator[Event]:
    """`stream`'s events until it ends or `stop` is set; then an ApiError, as for a stream
    that broke (the caller opens a new one)."""
    stopped = asyncio.ensure_future(stop.wait())
    following: asyncio.Future[Event] | None = None
    try:
        while True:
            following = asyncio.ensure_future(anext(stream))
            await asyncio.wait((following, stopped), return_when=asyncio.FIRST_COMPLETED)
            if not following.done():
                raise ApiError("registry: the tunnel to it works again: watching anew")
            try:
                event = following.result()
            except StopAsyncIteration:
                return
            yield event
    finally:
        stopped.cancel()
        if following is not None and not following.done():
            following.cancel()
            # asyncio.wait, not `await following`: a cancellation of our own that arrives
            # meanwhile must propagate, not be taken for the stream's.
            await asyncio.wait((following,))
        if following is not None and not following.cancelled():
            following.exception()  # retrieved: the stream is dropped either way
        close = getattr(stream, "aclose", None)
        if close is not None:
            await close()


async def report_self(client: Source, view: RegistryView, device: Device, io: Io,
                      t: RegistryTimings, nat: NatWatch | None = None) -> None:
    """Report this node (listen port, addresses, version, port mapping, and the NAT behaviour
    `nat` measured last) once the watch stream is open, then every report_every_s, and at once
    when the registry needs it again (a new epoch, a new port mapping, a new NAT
    measurement)."""
    while True:
        sent = view.mapped
        sent_nat = None if nat is None else nat.measured
        try:
            # Only the listen port: at start the agent's own read of a moment ago does.
            state = await device.state(fresh_s=SHARED_READ_S)
            interfaces = await io.local_addresses(device.name)
            view.local = tuple(interfaces)
            # Read while the watch stream opens, sent once it is open (RegistryView says why
            # it waits): the reads would otherwise delay every first punch (bench easy p50
            # 0.054-0.055 s with them after the stream, 0.049 s before it).
            await view.stream_open.wait()
            sent = view.mapped  # made meanwhile, most often: PCP answers within ms
            sent_nat = None if nat is None else nat.measured
            report = asyncio.ensure_future(client.report_self(
                Reported(state.listen_port, tuple(i.ip for i in interfaces), __version__,
                         sent, nat=None if sent_nat is None else sent_nat.behaviour,
                         ipv6=ipv6_endpoints(interfaces, state.listen_port))
            ))
            await asyncio.sleep(0)  # the report is on its way before any punch request
            view.allow_punches()
            await report
            log.debug("reported listen port %d and %d addresses", state.listen_port,
                      len(interfaces))
            wait = t.report_every_s
        except (ApiError, DeviceError, MalformedMessage) as error:
            log.debug("report to the registry failed: %s", error)
            wait = t.report_retry_s
        view.allow_punches()  # a report that fails must not stop our punches
        view.reported.clear()
        # A mapping or a NAT measurement that changed meanwhile is reported at once.
        if view.mapped != sent or (nat is not None and nat.measured is not sent_nat):
            view.reported.set()
        with contextlib.suppress(TimeoutError):  # asyncio.timeout: see reconcile_forever
            async with asyncio.timeout(wait):
                await view.reported.wait()
