"""The real `wgpunch registry` and `wgpunch node` processes, run inside a lab's hosts.

Each runs as a user would run it, through the CLI, in its host's namespace, logging JSON lines
to `<lab state dir>/<host>.agent.log`. They start in their own session, so a lab left up by
`wgpunch lab up --agents` keeps them; `lab down` kills everything inside its namespaces.

A lab with several registries (scenario `registries = N`) runs each by its host's name:
`start_registry("registry2")`; `stop(name, signal.SIGKILL)` kills one as a crash would, and
`start_registry(name)` again restarts it on the same device. A node follows each registry
its host has as a peer (one `--registry` each).
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import LabError
from ..protocol import API_PORT
from . import state
from .lab import Lab
from .netns import python_module, stop_process, wait_for

START_TIMEOUT_S = 10.0


class Agents:
    def __init__(self, lab: Lab, *, node_args: Sequence[str] = (),
                 registry_args: Sequence[str] = ()) -> None:
        self.lab = lab
        self.node_args = list(node_args)
        self.registry_args = list(registry_args)
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    def __enter__(self) -> Agents:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_exc: object) -> None:
        self.stop_all()
        if exc_type is not None:
            # What each agent logged, beside the failure: pytest shows it with the test's
            # output, and a failure seen once in CI can be read there.
            print(self.story())

    def story(self) -> str:
        """Every agent's events, in order of time, one line each."""
        lines = sorted((e.get("ts", 0.0), host, str(e.get("msg", ""))) for host in self.logs
                       for e in self.events(host))
        return "\n".join(f"{ts:.3f} {host}: {msg[:240]}" for ts, host, msg in lines)

    @property
    def registry(self) -> Any:
        return self.lab.host("registry")

    @property
    def registries(self) -> list[str]:
        return [node.name for node in self.lab.plan.registries]

    @property
    def nodes(self) -> list[str]:
        return [name for name, host in self.lab.hosts.items()
                if host.node.role == "host" and host.ifname is not None]

    def _launch(self, host: str, argv: list[str]) -> subprocess.Popen:
        if host in self.procs and self.procs[host].poll() is None:
            raise LabError(f"lab {self.lab.prefix}: an agent already runs in {host}")
        log = state.state_dir(self.lab.prefix) / f"{host}.agent.log"
        self.logs[host] = log
        command, env = python_module("wgpunch.cli", "--log-format", "json", *argv)
        with log.open("a") as out:
            proc = self.lab.host(host).ns.popen(
                command, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True,
            )
        self.procs[host] = proc
        return proc

    def start_registry(self, name: str = "registry", *, wait: bool = True) -> None:
        """`wgpunch registry` on registry host `name`'s device (again, after `stop`)."""
        if name not in self.registries:
            raise LabError(f"lab {self.lab.prefix}: no registry {name!r} "
                           f"(registries: {', '.join(self.registries)})")
        registry = self.lab.host(name)
        assert registry.ifname is not None
        self._launch(name, ["registry", "--interface", registry.ifname, *self.registry_args])
        if wait:
            wait_for(lambda: self._listening("-Hltn", API_PORT, f"the registry {name}", name),
                     timeout=START_TIMEOUT_S, what=f"the registry {name} to listen")

    def start_registries(self) -> None:
        for name in self.registries:
            self.start_registry(name)

    def start_rendezvous(self, args: Sequence[str], *, port: int) -> None:
        """`wgpunch rendezvous ARGS` in the registry's host, instead of a registry; waits
        until UDP `port` is bound."""
        self._launch("registry", ["rendezvous", *args])
        wait_for(lambda: self._listening("-Hlun", port, "the rendezvous server"),
                 timeout=START_TIMEOUT_S, what="the rendezvous server to listen")

    def start_relay(self, host: str, args: Sequence[str], *, control_port: int) -> None:
        """`wgpunch relay ARGS` in `host` (a relay on a host of its own); waits until its
        control API listens on TCP `control_port`."""
        self._launch(host, ["relay", *args])
        wait_for(lambda: self._listening("-Hltn", control_port, "the relay", host),
                 timeout=START_TIMEOUT_S, what="the relay's control API to listen")

    def _listening(self, ss_flags: str, port: int, what: str, host: str = "registry") -> bool:
        proc = self.procs[host]
        if proc.poll() is not None:
            raise LabError(f"lab: {what} exited ({proc.returncode}): {self.log_tail(host)}")
        out = self.lab.host(host).ns.run(["ss", ss_flags, f"sport = :{port}"],
                                         check=False).stdout
        return bool(out.strip())

    def start_node(self, host: str, *, registry_key: bool = True,
                   interface: bool = True) -> None:
        """`wgpunch node` in `host`, told the key of each registry it has as a peer unless
        `registry_key` is False (a node following a DNS-SD server needs none), and its
        interface unless `interface` is False (the node then finds it)."""
        node = self.lab.host(host)
        assert node.ifname is not None
        keys = [self.lab.host(name).public_key for name in node.node.registries]
        key = [arg for k in keys if k is not None for arg in ("--registry", k.base64())
               ] if registry_key else []
        where = ["--interface", node.ifname] if interface else []
        self._launch(host, ["node", *where, *key, *self.node_args])

    def start_nodes(self, hosts: Sequence[str] | None = None) -> None:
        for host in self.nodes if hosts is None else hosts:
            self.start_node(host)

    def stop(self, host: str, sig: int = signal.SIGTERM) -> int | None:
        proc = self.procs.pop(host, None)
        if proc is None:
            return None
        return stop_process(proc, sig=sig, timeout=5)

    def stop_all(self) -> None:
        for host in list(self.procs):
            self.stop(host)

    def check_alive(self) -> None:
        for host, proc in self.procs.items():
            if proc.poll() is not None:
                raise LabError(f"lab: the agent in {host} exited ({proc.returncode}): "
                               f"{self.log_tail(host)}")

    def log_tail(self, host: str, lines: int = 5) -> str:
        try:
            text = self.logs[host].read_text().strip().splitlines()
        except (KeyError, OSError):
            return "(no log)"
        return " | ".join(text[-lines:])

    def events(self, host: str) -> list[dict[str, Any]]:
        """The structured events an agent logged so far."""
        found = []
        try:
            lines = self.logs[host].read_text().splitlines()
        except (KeyError, OSError):
            return []
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and "event" in entry:
                found.append(entry)
        return found


def natpunch_flags(lab: Lab, mode: str, key_file: Path) -> tuple[list[str], list[str]]:
    """For a lab whose nodes do not have the registry as a peer: `wgpunch rendezvous` flags
    (both protocols, on the registry host's public address, its key in `key_file`, made if
    missing) and a node's flags to follow it, natpunch-go's protocol ("noise") or the
    wireguard-tools example's ("legacy")."""
    from ..keys import public_key
    from ..natpunch import keyfile
    from ..natpunch.wire import RENDEZVOUS_PORT

    server = lab.host("registry").public_ip
    rendezvous = ["--key", str(key_file), "--listen", f"{server}:{RENDEZVOUS_PORT}",
                  "--legacy", str(server)]
    if mode == "noise":
        public = public_key(keyfile.load_or_create(key_file))
        return rendezvous, ["--natpunch", f"{server}:{RENDEZVOUS_PORT}",
                            "--natpunch-server-key", str(public)]
    return rendezvous, ["--natpunch-legacy", str(server)]
