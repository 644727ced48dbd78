"""Network namespaces and the wireguard-go processes that live in them.

The primitives every lab object is built from. Nothing here touches the root namespace:
commands run through `ip netns exec`, and wireguard-go runs in the foreground (`-f`) as our
child, so stopping it is a signal to a process we own, not a search for a daemon.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, TypeVar, Unpack

from ..errors import LabError

UAPI_DIR = Path("/var/run/wireguard")
NETNS_DIR = Path("/run/netns")
# wireguard-go refuses to start on kernels >= 5.6 without this; this lab wants userspace.
WG_GO_ENV = {"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
IFNAME_MAX = 15  # IFNAMSIZ - 1

T = TypeVar("T")


class RunOptions(TypedDict, total=False):
    """The keyword arguments of `run`, for `Namespace.run` to pass on."""

    check: bool
    timeout: float
    input: str | None
    env: Mapping[str, str] | None


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError(
            "lab: network namespaces, veth links and nftables need root "
            "(run as root, or with CAP_NET_ADMIN and CAP_SYS_ADMIN)"
        )


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 30.0,
        input: str | None = None, env: Mapping[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    """Run a command and return its output; a failure is a LabError quoting the command."""
    full_env = None if env is None else {**os.environ, **env}
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, input=input,
            env=full_env, check=False,
        )
    except FileNotFoundError:
        raise LabError(f"lab: {argv[0]!r} is not installed") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"lab: {' '.join(argv)} did not finish in {timeout:.0f} s") from None
    if check and done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise LabError(
            f"lab: {' '.join(argv)} failed ({done.returncode}): "
            f"{detail[-1] if detail else 'no output'}"
        )
    return done


def wait_for(condition: Callable[[], T | None], *, timeout: float, interval: float = 0.01,
             what: str = "condition") -> T:
    """Poll `condition()` until it returns a true value; LabError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise LabError(f"lab: timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(interval)


def holds_for(condition: Callable[[], object], *, duration: float,
              interval: float = 0.05) -> bool:
    """Poll `condition()` for `duration` seconds; False as soon as it is false once.

    For negative results ("no handshake happens"), which no deadline-bounded wait can prove
    sooner: the duration is the claim's bound and belongs in the test's wording.
    """
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        if not condition():
            return False
        time.sleep(interval)
    return bool(condition())


@dataclass(frozen=True)
class Namespace:
    name: str

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def exists(self) -> bool:
        return (NETNS_DIR / self.name).exists()

    def add(self) -> None:
        run(["ip", "netns", "add", self.name])
        self.run(["ip", "link", "set", "lo", "up"])

    def delete(self) -> None:
        """Kill whatever still runs inside, then remove the namespace (idempotent)."""
        if not self.exists():
            return
        pids = run(["ip", "netns", "pids", self.name], check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        run(["ip", "netns", "delete", self.name], check=False)

    def run(self, argv: Sequence[str], **kwargs: Unpack[RunOptions]
            ) -> subprocess.CompletedProcess[str]:
        return run(self.argv(argv), **kwargs)

    def ip_batch(self, commands: Sequence[str]) -> None:
        """Many `ip` commands in one process (`ip -n NS -batch -`); stops at the first error."""
        if commands:
            run(["ip", "-n", self.name, "-batch", "-"], input="\n".join(commands) + "\n")

    def popen(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              **kwargs: Any) -> subprocess.Popen[Any]:
        full_env = {**os.environ, **(env or {})}
        return subprocess.Popen(self.argv(argv), env=full_env, **kwargs)


def python_module(module: str, *args: str) -> tuple[list[str], dict[str, str]]:
    """argv and env to run `python3 -m module` (a wgpunch helper) inside a namespace."""
    src = str(Path(__file__).resolve().parents[2])  # the directory holding `wgpunch/`
    path = os.environ.get("PYTHONPATH")
    return [sys.executable, "-m", module, *args], {
        "PYTHONPATH": f"{src}:{path}" if path else src
    }


def read_line(proc: subprocess.Popen, *, timeout: float, what: str) -> str:
    """The next line of a child's stdout pipe, within `timeout` seconds."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise LabError(f"lab: {what} said nothing within {timeout:.1f} s")
    line = proc.stdout.readline()
    if not line:
        raise LabError(f"lab: {what} exited ({proc.poll()}) before it was ready")
    return line.decode(errors="replace").strip() if isinstance(line, bytes) else line.strip()


def stop_process(proc: subprocess.Popen, *, sig: int = signal.SIGTERM,
                 timeout: float = 10.0) -> int:
    """Ask `proc` to stop with `sig`, kill it if it has not after `timeout`; its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    return proc.returncode


def uapi_socket(ifname: str) -> Path:
    return UAPI_DIR / f"{ifname}.sock"


def _accepts(path: Path) -> bool:
    """Whether a unix socket takes connections. Its file appears at bind(), before listen():
    a `wg set` in between fails ("Protocol not supported": wg then asks the kernel)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


class WireguardGo:
    """A wireguard-go process serving one interface inside a namespace.

    With `log`, its output goes to that file instead of a pipe: a lab left running by
    `wgpunch lab up` outlives our process, and a daemon writing an error into a pipe nobody
    reads any more would die of SIGPIPE.
    """

    def __init__(self, ns: Namespace, ifname: str, *, log: Path | None = None) -> None:
        if len(ifname) > IFNAME_MAX:
            raise LabError(f"lab: interface name {ifname!r} is longer than {IFNAME_MAX}")
        self.ns = ns
        self.ifname = ifname
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> None:
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the process without waiting for its socket (see `wait_ready`)."""
        if uapi_socket(self.ifname).exists():
            raise LabError(f"lab: {uapi_socket(self.ifname)} already exists (name clash?)")
        # The child keeps its own copy of the log file descriptor; ours closes at once.
        output = (open(self.log, "ab") if self.log  # noqa: SIM115 - `with` below closes it
                  else contextlib.nullcontext(subprocess.PIPE))
        with output as stderr:
            self.proc = self.ns.popen(
                ["wireguard-go", "-f", self.ifname], env=WG_GO_ENV,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 10.0) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise LabError(f"lab: wireguard-go {self.ifname} exited: {self._output()}")
            return _accepts(uapi_socket(self.ifname))

        wait_for(ready, timeout=timeout, what=f"wireguard-go {self.ifname} to listen")

    def _output(self) -> str:
        if self.log is not None:
            text = self.log.read_text(errors="replace") if self.log.exists() else ""
        elif self.proc is not None and self.proc.stderr:
            text = self.proc.stderr.read().decode(errors="replace")
        else:
            text = ""
        return text.strip()[-300:]

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=5)
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None
        uapi_socket(self.ifname).unlink(missing_ok=True)
