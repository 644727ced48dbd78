"""One node agent per interface (node/lock.py): in one process, across real processes, and in
`wgpunch node`'s serve(), which takes the lock before it opens the device, all in a state
directory of the test's own (never /run/wgpunch)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import wgpunch
from wgpunch.cli import build_parser
from wgpunch.errors import ConfigError, DeviceNotFound
from wgpunch.node.cli import settings_from
from wgpunch.node.lock import agent_lock, lock_file
from wgpunch.node.serve import serve

SRC = str(Path(wgpunch.__file__).resolve().parents[1])
KEY = "Rm9yIGV4YW1wbGUgb25seSwgbm90IGEgcmVhbCBrZXk="

HOLD = """\
import sys
from pathlib import Path
from wgpunch.node.lock import agent_lock
with agent_lock(sys.argv[1], Path(sys.argv[2])):
    print("locked", flush=True)
    sys.stdin.read()  # until the test closes stdin or kills us
"""


@contextmanager
def holder(ifname: str, directory: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process that holds `ifname`'s lock until the block ends."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, ifname, str(directory)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": SRC})
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "locked\n"  # returns when the child locked or died
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_second_holder_in_the_same_process_is_refused(tmp_path):
    with agent_lock("wg0", tmp_path) as path:
        assert path == lock_file("wg0", tmp_path) == tmp_path / "wg0.lock"
        assert path.read_text() == f"{os.getpid()}\n"
        with pytest.raises(ConfigError) as error, agent_lock("wg0", tmp_path):
            pass
        assert str(error.value) == (f"node: another agent already steers wg0: pid "
                                    f"{os.getpid()} holds {path}")
        with agent_lock("wg1", tmp_path):  # another interface: its own lock
            pass
    with agent_lock("wg0", tmp_path):  # released at the end of the block
        pass


def test_the_lock_goes_away_with_the_process_that_held_it(tmp_path):
    with holder("wg0", tmp_path) as proc:
        with pytest.raises(ConfigError, match=f"pid {proc.pid} holds"), \
                agent_lock("wg0", tmp_path):
            pass
        proc.kill()  # no chance to clean up: the kernel drops the lock
        proc.wait()
        with agent_lock("wg0", tmp_path) as path:
            assert path.read_text() == f"{os.getpid()}\n"  # the old pid is gone too


def test_a_state_directory_that_cannot_be_made_is_one_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"cannot open the lock file .*: Not a directory"), \
            agent_lock("wg0", tmp_path / "file" / "wgpunch"):
        pass


def test_serve_takes_the_lock_before_it_opens_the_device(tmp_path):
    # No device named nosuchwg0 exists: had serve() opened it first, DeviceNotFound (or a
    # ConfigError about the device) would come instead of the lock's message.
    settings = settings_from(build_parser().parse_args(
        ["node", "-i", "nosuchwg0", "--registry", KEY]), environ={})
    with holder("nosuchwg0", tmp_path) as proc, pytest.raises(
            ConfigError, match=f"another agent already steers nosuchwg0: pid {proc.pid} holds"):
        asyncio.run(serve(settings, state_dir=tmp_path))
    with pytest.raises(DeviceNotFound, match="nosuchwg0"):  # the lock free: the device next
        asyncio.run(serve(settings, state_dir=tmp_path))
