"""The wgpunch(1) manual page (manpage.py): made from the parser, with what the commands'
epilogs say, and clean for groff."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import wgpunch

pytest.importorskip("argparse_manpage", reason="argparse-manpage (the test extra) is missing")

from wgpunch import manpage  # after the skip: it needs argparse_manpage
from wgpunch.config import schemas

SRC = str(Path(wgpunch.__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def page() -> str:
    return manpage.render()


def test_every_command_has_its_section(page):
    commands = re.findall(r"^\.SH COMMAND .*'wgpunch ([a-z ]+)'", page, flags=re.M)
    for name in ("registry", "node", "rendezvous", "status", "lab up", "demo",
                 "systemd install", "completion"):
        assert name in commands


def test_the_epilogs_are_there_as_notes(page):
    notes = page.split(".SH NOTES", 1)[1].split(".SH ENVIRONMENT", 1)[0]
    for schema in schemas():  # every key's variable
        assert f'.SS "wgpunch {schema.command}"' in notes
        for option in schema.options:
            assert option.env in notes
    assert "/run/wgpunch/IF.lock" in page and "NOTIFY_SOCKET" in page


@pytest.mark.parametrize(("text", "want"), [
    ("--config FILE", "\\-\\-config FILE"),
    (".starts like a request", "\\&.starts like a request"),
    ("'so does this", "\\&'so does this"),
    ("a \\ backslash", "a \\e backslash"),
])
def test_roff(text, want):
    assert manpage.roff(text) == want


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
def test_groff_has_no_warning(tmp_path):
    out = tmp_path / "wgpunch.1"
    done = subprocess.run([sys.executable, "-m", "wgpunch.manpage", str(out)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": SRC})
    assert done.returncode == 0, done.stderr
    checked = subprocess.run(["groff", "-man", "-ww", "-z", str(out)], capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0 and checked.stderr == ""
