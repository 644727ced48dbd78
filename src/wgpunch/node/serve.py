"""`wgpunch node` running: the agent on one interface, or one per interface that qualifies
(fleet.py), each under the interface's lock, until a signal; `--once` makes one pass.

cli.py reads the options into `Settings` and imports this module only to run them, so that
`node --help` and a mistaken flag load none of it (bench/startup.py).
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import signal
from collections.abc import Coroutine
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import config, sdnotify
from ..errors import ConfigError, DeviceError
from ..keys import Key
from ..natpunch.wire import LEGACY_PORT, RENDEZVOUS_PORT
from ..wg.model import DeviceState, Endpoint
from . import pathfile
from .lock import agent_lock

if TYPE_CHECKING:
    from ..exposition import MetricsServer
    from .agent import Agent
    from .cli import Settings
    from .exporter import NodeExporter
    from .mesh import Mesh
    from .source import Source

log = logging.getLogger(__name__)


def registries_of(state: DeviceState, registries: tuple[Key, ...]) -> tuple[Key, ...]:
    """Which of the registries' keys this device follows: those that are its peers."""
    found = tuple(key for key in registries if state.peer(key) is not None)
    if not found:
        raise ConfigError(f"node: {state.name} has none of the registries given "
                          f"({', '.join(map(str, registries))}) as a peer")
    return found


async def serve(settings: Settings, *, once: bool = False,
                state_dir: Path = pathfile.STATE_DIR) -> int:
    """Run the agent (one pass with `once`) while holding the interface's lock
    (node/lock.py), taken before the device is opened: a second agent on IF exits at once.
    Without an interface, one agent per interface that qualifies (fleet.py), until a
    signal."""
    if settings.interface is None:
        if once:
            raise ConfigError("node: --once steers one interface: give --interface IF")
        gc.enable()  # the fleet may wait long for its first interface (node/cli.py `run`)
        return await _until_signal(_fleet(settings, state_dir), "every interface", (
            "every WireGuard interface" + (" with a registry's peer" if settings.registries
                                           else "")))
    with agent_lock(settings.interface, state_dir):
        return await _serve(settings, once=once, state_dir=state_dir)


async def _fleet(settings: Settings, state_dir: Path) -> None:
    from .fleet import Fleet

    def wanted(state: DeviceState) -> bool:
        if settings.registries:
            return any(state.peer(key) is not None for key in settings.registries)
        if settings.registry_mode:  # a peer that may be the registry (node/discover.py)
            from .discover import candidates

            return state.public_key is not None and bool(candidates(state))
        return state.public_key is not None

    async def steer(interface: str) -> None:
        one = replace(settings, interface=interface)
        with agent_lock(interface, state_dir):
            await _serve(one, once=False, state_dir=state_dir, supervised=True)

    await Fleet(steer, wanted).run()


async def _until_signal(work: Coroutine[Any, Any, object], name: str, what: str) -> int:
    """Run `work` until SIGTERM or SIGINT (exit status 0), telling systemd when it starts
    and stops."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def stop() -> None:
        sdnotify.notify("STOPPING=1")
        task.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    sdnotify.notify("READY=1", f"STATUS=steering {what}")
    try:
        await work
    except asyncio.CancelledError:
        log.info("node on %s: stopped", name)
    return 0


async def _serve(settings: Settings, *, once: bool, state_dir: Path,
                 supervised: bool = False) -> int:
    # Imported here, and each source only in its own mode: each mode loads only its own
    # client (bench/startup.py).
    from ..wg import open_device
    from .agent import Agent
    from .registrylink import LinkTimings
    from .timings import Timings

    interface = settings.interface
    assert interface is not None
    device = open_device(interface)
    try:
        state = await device.state()
    except DeviceError as error:
        if error.errno in (errno.EACCES, errno.EPERM):
            raise ConfigError(f"node: cannot control {interface}: {error}; the node needs "
                              "root (CAP_NET_ADMIN)") from None
        raise
    several: tuple[Key, ...] = ()  # IF follows each of these (node/registries.py)
    if settings.registry is None and settings.registries:
        found = registries_of(state, settings.registries)
        if len(found) == 1:
            settings = replace(settings, registry=found[0])
        elif settings.api:
            raise ConfigError(f"node: {interface} has several registries as peers; --api names "
                              "one API (each registry's is found at its tunnel address)")
        else:
            several = found
    elif settings.registry is None and settings.registry_mode:
        from .discover import find_registry

        settings = replace(settings, registry=await find_registry(state))
    source: Source
    server_key = settings.natpunch_server_key
    natpunch = settings.natpunch or settings.natpunch_legacy
    if natpunch:
        from .natpunch import NatpunchSource, resolve_server

        rendezvous = await resolve_server(natpunch, RENDEZVOUS_PORT if settings.natpunch
                                          else LEGACY_PORT)
        source = NatpunchSource(rendezvous, server_key, device, interval_s=settings.interval_s)
        await source.connect(state.listen_port, state.public_key)  # fail now, not later
        where = (f"natpunch server {rendezvous} (key {server_key})" if server_key
                 else f"natpunch legacy server {rendezvous} (unauthenticated)")
    elif settings.dns_sd is not None:
        from .dnssd import DnsSdSource

        source = DnsSdSource(settings.dns_sd, str(settings.zone), device,
                             interval_s=settings.interval_s)
        where = f"DNS-SD {settings.dns_sd}, zone {settings.zone}"
    elif several:
        from .client import RegistryClient
        from .edges import SystemClock
        from .registries import Registries
        from .source import registry_api_url

        token = (None if settings.token_file is None
                 else config.read_token(settings.token_file, "node"))
        apis = [registry_api_url(state, key) for key in several]
        source = Registries(device, [(key, RegistryClient(api, token=token))
                                     for key, api in zip(several, apis, strict=True)],
                            SystemClock())
        where = ", ".join(f"registry {key}, API {api}"
                          for key, api in zip(several, apis, strict=True))
    else:
        assert settings.registry is not None
        from .client import RegistryClient
        from .source import registry_api_url

        token = (None if settings.token_file is None
                 else config.read_token(settings.token_file, "node"))
        api = settings.api or registry_api_url(state, settings.registry)
        source = RegistryClient(api, token=token)
        where = f"registry {settings.registry}, API {api}"
    mesh = _mesh(settings, interface, state_dir, several) if settings.mesh else None
    exporter = None if once or settings.metrics_listen is None else _exporter()
    agent = Agent(device, settings.registry, source,
                  timings=Timings(keepalive_s=settings.keepalive_s),
                  opener_ttl=settings.opener_ttl, state_dir=state_dir, mesh=mesh,
                  metrics=exporter, portmap=settings.portmap and not once,
                  natprobe_port=settings.natprobe_port or None,
                  registry_link=(LinkTimings() if settings.registry is not None or several
                                 else None))
    # Built: from now on the collector runs (node/cli.py `run`). Alone, the agent lives as long
    # as the process: the collector need not pass over what it is made of again (the cycles
    # the imports left, ~90 kB, stay). A fleet's agents come and go: theirs is collected.
    if not supervised:
        gc.freeze()
    gc.enable()
    metrics_server: MetricsServer | None = None
    try:
        if once:
            failures = await agent.run_once()
            return 1 if failures else 0
        if exporter is not None and settings.metrics_listen is not None:
            metrics_server = await _serve_metrics(exporter, agent, settings.metrics_listen)
        log.info("node on %s: %s%s", interface, where, ", managed mesh" if mesh else "",
                 extra={"event": "started", "interface": interface})
        if supervised:
            await agent.run()
            return 0
        return await _until_signal(agent.run(), interface, f"{interface}: {where}")
    finally:
        if metrics_server is not None:
            await metrics_server.close()
        await source.close()
        await device.close()


def _mesh(settings: Settings, interface: str, state_dir: Path, several: tuple[Key, ...]) -> Mesh:
    from .mesh import MESH_DIR, Mesh  # only with --mesh (bench/startup.py)

    # Beside the path files when a caller (a test) moves them, else persistent (mesh.py).
    mesh_dir = MESH_DIR if state_dir == pathfile.STATE_DIR else state_dir
    return Mesh(interface, mesh_dir, settings.registry or next(iter(several), None),
                settings.mesh_exclude)


def _exporter() -> NodeExporter:
    from .exporter import NodeExporter  # prometheus_client: only with --metrics-listen

    return NodeExporter()


async def _serve_metrics(exporter: NodeExporter, agent: Agent, endpoint: Endpoint
                         ) -> MetricsServer:
    from ..exposition import serve as serve_metrics

    exporter.watch_agent(agent)
    return await serve_metrics(exporter.registry, endpoint, "node")

