"""What a lab leaves on the machine, found by its prefix: listing and removal.

A lab with prefix P owns exactly: namespaces `P-*`, wireguard-go sockets
`/var/run/wireguard/P-*.sock`, and its state directory `/run/wgpunch-lab/P/` (mode 0700:
the description `lab.json`, WireGuard configs with private keys (0600), daemon logs).
Prefixes contain no `-`, so `P-*` never matches another lab's objects. `remove()` needs
nothing but the prefix, so it also cleans up after a run that was killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import LabError
from .netns import NETNS_DIR, UAPI_DIR, Namespace, run

STATE_ROOT = Path("/run/wgpunch-lab")
PREFIX_RE = re.compile(r"[a-z][a-z0-9]{0,7}")
TERM_GRACE_S = 3.0  # wireguard-go exits on SIGTERM within milliseconds; then SIGKILL


def check_prefix(prefix: str) -> str:
    if not PREFIX_RE.fullmatch(prefix):
        raise LabError(
            f"lab: bad prefix {prefix!r}: 1-8 lowercase letters/digits, starting with a letter "
            "(it is part of 15-character interface names)"
        )
    return prefix


def random_prefix() -> str:
    return "wl" + secrets.token_hex(2)


def state_dir(prefix: str) -> Path:
    return STATE_ROOT / prefix


def namespaces(prefix: str) -> list[Namespace]:
    if not NETNS_DIR.is_dir():
        return []
    return [Namespace(p.name) for p in sorted(NETNS_DIR.iterdir())
            if p.name.startswith(f"{prefix}-")]


def sockets(prefix: str) -> list[Path]:
    return sorted(UAPI_DIR.glob(f"{prefix}-*.sock")) if UAPI_DIR.is_dir() else []


def in_use(prefix: str) -> bool:
    return bool(state_dir(prefix).exists() or namespaces(prefix) or sockets(prefix))


def claim(prefix: str) -> Path:
    """Create the lab's state directory; refuse a prefix that anything still uses."""
    check_prefix(prefix)
    if in_use(prefix):
        raise LabError(
            f"lab: prefix {prefix!r} is in use (namespaces, sockets or {state_dir(prefix)}); "
            f"pick another or run `wgpunch lab down --prefix {prefix}`"
        )
    STATE_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
    path = state_dir(prefix)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:  # another run claimed it between the check and here
        raise LabError(f"lab: prefix {prefix!r} is in use") from None
    return path


@dataclass(frozen=True)
class Removed:
    namespaces: int
    processes: int
    sockets: int
    state_dir: bool


def remove(prefix: str) -> Removed:
    """Stop every process in the lab's namespaces, delete them, its sockets and state dir."""
    check_prefix(prefix)
    spaces = namespaces(prefix)
    pids = {pid for ns in spaces for pid in _pids(ns)}
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    # Let wireguard-go close its socket and TUN device; whatever is left gets SIGKILL below.
    deadline = time.monotonic() + TERM_GRACE_S
    while any(_pids(ns) for ns in spaces) and time.monotonic() < deadline:
        time.sleep(0.01)
    for ns in spaces:
        ns.delete()
    _delete_stragglers(prefix)
    socks = sockets(prefix)
    for sock in socks:
        sock.unlink(missing_ok=True)
    remove_agent_files(f"{prefix}-*")
    path = state_dir(prefix)
    had_dir = path.exists()
    shutil.rmtree(path, ignore_errors=True)
    left = namespaces(prefix)
    if left:
        raise LabError(f"lab {prefix}: could not delete {', '.join(ns.name for ns in left)}")
    return Removed(len(spaces), len(pids), len(socks), had_dir)


def remove_agent_files(interfaces: str) -> None:
    """What node agents on the interfaces named `interfaces` (a glob) leave in the machine's
    own directories: their locks and path files (a killed agent removes neither; a lock file
    stays by design: node/lock.py) and `--mesh` state. A lab's, by its prefix (`P-*`); a
    test's or a bench's that runs agents outside a lab, by its interfaces' names."""
    from ..node.mesh import MESH_DIR
    from ..node.pathfile import STATE_DIR

    for directory, suffix in ((STATE_DIR, ".lock"), (STATE_DIR, ".json"),
                              (MESH_DIR, ".mesh.json")):
        for path in directory.glob(interfaces + suffix):
            path.unlink(missing_ok=True)


def _delete_stragglers(prefix: str) -> None:
    """Delete namespaces that appeared while the lab was being removed.

    On Ctrl-C during `lab up`, subprocess gives an interrupted child only a brief wait (it
    assumes the child got SIGINT too, which a signal sent to this process alone does not do),
    so an `ip netns add` of the build may still finish after the lab's namespaces were listed.
    """
    deadline = time.monotonic() + TERM_GRACE_S
    while (left := namespaces(prefix)) and time.monotonic() < deadline:
        for ns in left:
            ns.delete()
        time.sleep(0.01)


def _pids(ns: Namespace) -> list[int]:
    out = run(["ip", "netns", "pids", ns.name], check=False).stdout.split()
    return [int(pid) for pid in out if pid.isdigit()]


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


@dataclass(frozen=True)
class LabSummary:
    prefix: str
    scenario: str | None  # None when the state dir or its description is gone
    namespaces: int
    sockets: int


def list_labs() -> list[LabSummary]:
    """Labs from their state directories, plus orphans found by their `P-core` namespace."""
    prefixes = {p.name for p in STATE_ROOT.iterdir()} if STATE_ROOT.is_dir() else set()
    for entry in NETNS_DIR.iterdir() if NETNS_DIR.is_dir() else ():
        head, _, rest = entry.name.partition("-")
        if rest == "core" and PREFIX_RE.fullmatch(head):
            prefixes.add(head)
    labs = []
    for prefix in sorted(prefixes):
        try:
            scenario = json.loads((state_dir(prefix) / "lab.json").read_text())["scenario"]
        except (OSError, ValueError, KeyError, TypeError):
            scenario = None
        labs.append(LabSummary(prefix, scenario, len(namespaces(prefix)), len(sockets(prefix))))
    return labs
