"""`wgpunch node` without `--interface`: one agent per WireGuard interface that qualifies (has
the registry's peer; any interface with a key for the registries that are no peer), in one
process. Interfaces are looked for every `rescan_s`: one that appears (wg-quick up) or comes
to qualify gets an agent, one that vanishes or stops qualifying has its agent stopped.

The supervisor knows nothing of agents: `steer(IF)` runs one until cancelled (serve.py gives it
the ordinary single-interface agent, which takes IF's lock, node/lock.py). An agent that ends
by itself (another agent holds IF's lock, the device went away as it started) is logged once
per distinct error and started again at a later scan while IF still qualifies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from ..errors import DeviceError, DeviceNotFound, WgpunchError
from ..wg import Device, DeviceState, list_devices, open_device

log = logging.getLogger(__name__)

# How often to look for interfaces that came or went. Our choice: an interface brought up is
# steered within about this long, at the cost of one read per interface per scan.
RESCAN_S = 2.0


class Fleet:
    def __init__(self, steer: Callable[[str], Coroutine[Any, Any, None]],
                 wanted: Callable[[DeviceState], bool], *, rescan_s: float = RESCAN_S,
                 devices: Callable[[], Awaitable[list[str]]] = list_devices,
                 opener: Callable[[str], Device] = open_device) -> None:
        self.steer = steer
        self.wanted = wanted
        self.rescan_s = rescan_s
        self.devices = devices
        self.opener = opener
        self.agents: dict[str, asyncio.Task[None]] = {}
        self.failed: dict[str, str] = {}  # the last error logged per interface

    async def run(self) -> None:
        """Scan, start and stop agents until cancelled; then stop every agent."""
        try:
            while True:
                await self.scan()
                await asyncio.sleep(self.rescan_s)
        finally:
            await self.stop(*self.agents)

    async def scan(self) -> None:
        qualify = {name for name in await self.devices() if await self._qualifies(name)}
        for name, task in list(self.agents.items()):
            if name not in qualify:  # its agent may have ended of it already (device gone)
                log.info("node: %s is gone or no longer has the registry's peer; let go", name,
                         extra={"event": "interface_gone", "interface": name})
                await self.stop(name)
            elif task.done():
                del self.agents[name]
                self._ended(name, task)
        for name in sorted(qualify - set(self.agents)):
            if name not in self.failed:
                log.info("node: steering %s", name,
                         extra={"event": "interface_found", "interface": name})
            self.agents[name] = asyncio.create_task(self.steer(name), name=f"agent {name}")
        for name in set(self.failed) - qualify:
            del self.failed[name]

    async def stop(self, *names: str) -> None:
        tasks = [self.agents.pop(name) for name in names]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _qualifies(self, name: str) -> bool:
        try:
            device = self.opener(name)
        except DeviceNotFound:  # gone between the listing and now
            return False
        try:
            return self.wanted(await device.state())
        except (DeviceError, DeviceNotFound):
            return False
        finally:
            with contextlib.suppress(WgpunchError, OSError):
                await device.close()

    def _ended(self, name: str, task: asyncio.Task[None]) -> None:
        error = None if task.cancelled() else task.exception()
        while isinstance(error, BaseExceptionGroup):  # the agent's TaskGroup: its first
            error = error.exceptions[0]
        text = "stopped" if error is None else str(error)
        if self.failed.get(name) != text:
            log.warning("node: the agent on %s ended: %s; started again while %s qualifies",
                        name, text, name, extra={"event": "agent_ended", "interface": name})
        self.failed[name] = text
        if error is not None and not isinstance(error, WgpunchError | OSError):
            log.error("node: the agent on %s failed", name, exc_info=error)
