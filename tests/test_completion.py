"""`wgpunch completion bash|zsh` (completion.py): scripts the shells accept, and bash
completing real command lines with the script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import wgpunch
from wgpunch import completion

SRC = str(Path(wgpunch.__file__).resolve().parents[1])


def wgpunch_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wgpunch", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": SRC})


@pytest.fixture(scope="module")
def bash_script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("completion") / "wgpunch.bash"
    path.write_text(completion.script("bash"))
    return path


@pytest.mark.parametrize("shell", completion.SHELLS)
def test_the_command_prints_the_script(shell):
    done = wgpunch_cli("completion", shell)
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout == completion.script(shell)


def test_an_unknown_shell_is_a_usage_error():
    done = wgpunch_cli("completion", "fish")
    assert done.returncode == 2 and "invalid choice: 'fish'" in done.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_accepts_the_script(bash_script):
    done = subprocess.run(["bash", "-n", str(bash_script)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == ""


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_accepts_the_script(tmp_path):
    path = tmp_path / "_wgpunch"
    path.write_text(completion.script("zsh"))
    done = subprocess.run(["zsh", "-n", str(path)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == ""
    assert path.read_text().startswith("#compdef wgpunch")


COMPLETE = """\
source "$1"; shift
COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 ))
COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}
_shtab_wgpunch
printf '%s\\n' "${COMPREPLY[@]}"
"""


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
@pytest.mark.parametrize(("words", "want", "intent"), [  # exactly `want`, unless "..."
    (["wgpunch", "sys"], ["systemd"], "a command"),
    (["wgpunch", "systemd", ""], ["install"], "a command's command"),
    (["wgpunch", "node", "--inter"], ["--interface", "--interval"], "an option"),
    (["wgpunch", "completion", ""], ["bash", "zsh"], "choices"),
    (["wgpunch", "node", "--interface", "l"], ["lo", "..."], "network interfaces"),
    (["wgpunch", "registry", "--config", "TMP/"], ["TMP/wg0.toml", "TMP/wg1.toml", "TMP/units"],
     "a FILE: files, and directories to go into"),
    (["wgpunch", "systemd", "install", "--dir", "TMP/"], ["TMP/units"],
     "a DIR is a directory"),
])
def test_bash_completes(words, want, intent, bash_script, tmp_path):
    for name in ("wg0.toml", "wg1.toml"):
        (tmp_path / name).write_text("")
    (tmp_path / "units").mkdir()
    words = [word.replace("TMP", str(tmp_path)) for word in words]
    want = [word.replace("TMP", str(tmp_path)) for word in want]
    done = subprocess.run(["bash", "-c", COMPLETE, "complete", str(bash_script), *words],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    got = done.stdout.split()
    if "..." in want:
        assert set(want) - {"..."} <= set(got), (intent, got)
    else:
        assert sorted(got) == sorted(want), intent
