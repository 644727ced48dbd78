"""One node agent per interface: an exclusive flock(2) on `STATE_DIR/IF.lock`.

Two agents steering one interface would undo each other's changes, and the one that exits
first deletes the other's path file (pathfile.py). The agent holds the lock from before it
opens the device until it returns; the kernel drops a flock with the last descriptor of its
open file, so a killed agent leaves no stale lock. The file stays (removing it would let a
third agent lock a new file while the second holds the old one) and holds the holder's pid,
for the message a second agent prints.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import ConfigError
from .pathfile import STATE_DIR


def lock_file(ifname: str, directory: Path = STATE_DIR) -> Path:
    return directory / f"{ifname}.lock"


@contextlib.contextmanager
def agent_lock(ifname: str, directory: Path = STATE_DIR) -> Iterator[Path]:
    """Hold `ifname`'s lock for the `with` block. A `ConfigError` naming the holder's pid if
    another process holds it, or naming the file if it cannot be made."""
    path = lock_file(ifname, directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as error:
        raise ConfigError(f"node: cannot open the lock file {path}: {error.strerror}; the "
                          f"node needs a writable {directory} (as root, or "
                          "RuntimeDirectory=wgpunch under systemd)") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"node: another agent already steers {ifname}: pid "
                              f"{_holder(fd)} holds {path}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    # The holder writes its pid right after locking: empty only in that instant.
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return text if text.isdigit() else "unknown"
