"""What the benchmarks share: a wireguard-go device in a throwaway namespace, a `wgpunch`
daemon run in one, CPU and memory from /proc, percentiles, the table they print, and the
compiled bytecode every process they start runs from.

Imported by bench/registry_scale.py, bench/agent_footprint.py, bench/dns.py,
bench/startup.py and bench/time_to_direct.py (run as scripts: this directory is on their
path).
"""

from __future__ import annotations

import asyncio
import atexit
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wgpunch.keys import Key, generate_keypair
from wgpunch.lab.netns import Namespace, WireguardGo, python_module, stop_process, wait_for
from wgpunch.wg.model import PeerConfig
from wgpunch.wg.uapi import UapiDevice

SRC = Path(__file__).resolve().parents[1] / "src"
BATCH = 500  # peers per configure transaction: one UAPI `set` each


def prefix(letters: str) -> str:
    """A lab prefix unique enough for names machine-wide (interfaces, namespaces)."""
    return letters + secrets.token_hex(2)


def commit() -> str:
    git = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "--short",
                          "HEAD"], capture_output=True, text=True, check=False)
    return git.stdout.strip()


def exit_on_sigterm() -> None:
    """Stopped from outside (timeout, kill): tear the lab down on the way out all the same."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(f"stopped by signal {signal.SIGTERM}"))


# -- devices and daemons ------------------------------------------------------------------------


def start_device(ns: Namespace, ifname: str, address: str, listen_port: int, log: Path
                 ) -> tuple[WireguardGo, Key]:
    """A running wireguard-go `ifname` in `ns` with a fresh key, `listen_port` and `address`
    (CIDR), up; its daemon and public key. The caller stops the daemon."""
    wireguard_go = WireguardGo(ns, ifname, log=log)
    wireguard_go.start()
    try:
        private, public = generate_keypair()
        with tempfile.NamedTemporaryFile("w", suffix=".key") as keyfile:
            os.chmod(keyfile.name, 0o600)
            keyfile.write(private.base64())
            keyfile.flush()
            ns.run(["wg", "set", ifname, "private-key", keyfile.name, "listen-port",
                    str(listen_port)])
        ns.ip_batch([f"addr add {address} dev {ifname}", f"link set {ifname} up"])
    except BaseException:
        wireguard_go.stop()
        raise
    return wireguard_go, public


async def fill(ifname: str, configs: Sequence[PeerConfig]) -> None:
    """Add `configs` to the device through the device layer, `BATCH` peers a transaction."""
    device = UapiDevice(ifname)
    try:
        for start in range(0, len(configs), BATCH):
            await device.configure(list(configs[start:start + BATCH]))
    finally:
        await device.close()


def fill_device(ifname: str, configs: Sequence[PeerConfig]) -> None:
    asyncio.run(fill(ifname, configs))


@contextmanager
def run_wgpunch(ns: Namespace, argv: Sequence[str], log: Path, *, ready: str | None = None,
           profile: str | None = None, timeout: float = 30.0
           ) -> Iterator[subprocess.Popen[bytes]]:
    """`wgpunch --log-format json ARGV` in `ns`, its output in `log`, until the block ends;
    with `ready`, first waits until that text is in the log. With `profile`, it runs under
    cProfile, which writes its stats there when the process exits (it stops cleanly on
    SIGTERM)."""
    command, env = python_module("wgpunch.cli", "--log-format", "json", *argv)
    if profile:
        command[1:1] = ["-m", "cProfile", "-o", profile]
    with log.open("w") as out:
        proc = ns.popen(command, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                        start_new_session=True)
    try:
        if ready is not None:
            wait_for(lambda: proc.poll() is not None or ready in log.read_text(),
                     timeout=timeout, what=f"{argv[0]} to log {ready}")
            if proc.poll() is not None:
                raise RuntimeError(f"{argv[0]} exited: {log.read_text()[-500:]}")
        yield proc
    finally:
        stop_process(proc)


def run_from_bytecode() -> None:
    """Every process started from now on runs wgpunch from compiled bytecode, as an installed
    package does (pip writes .pyc files at install). A source tree run with
    PYTHONDONTWRITEBYTECODE=1, as this machine's environment sets, compiles every module at
    every start: ~0.1-0.2 s of a node's start-up here, which no installed node pays. The
    bytecode goes to a private cache (PYTHONPYCACHEPREFIX), removed at exit, never into the
    tree; the interpreter's own modules go there on first import (a bench's warm-up run)."""
    cache = tempfile.mkdtemp(prefix="wgpunch-bench-pyc-")
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
    os.environ["PYTHONPYCACHEPREFIX"] = cache
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(SRC)], check=True)


# -- /proc --------------------------------------------------------------------------------------


def cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) a process has used; 0 for none."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, names: Sequence[str] = ("VmRSS", "VmHWM")) -> dict[str, int]:
    """Fields of /proc/PID/status in KiB (or a count, for Threads): by default resident
    memory and its peak."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in names:
            found[name] = int(value.split()[0])
    return found


def machine_cpu() -> tuple[int, int]:
    """The machine's CPU counters from /proc/stat: busy and total jiffies, all cores."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    total = sum(fields[:8])
    return total - fields[3] - fields[4], total  # idle and iowait are not busy


def busy_cores(since: tuple[int, int]) -> float:
    """How many cores were busy on average since `machine_cpu()` gave `since`: every
    process's, other users' too."""
    busy, total = machine_cpu()
    elapsed = total - since[1]
    return (busy - since[0]) / elapsed * (os.cpu_count() or 1) if elapsed > 0 else 0.0


# -- results ------------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """The nearest-rank `p`th percentile; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Columns right-aligned to their widest cell."""
    table = [tuple(header), *(tuple(row) for row in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
