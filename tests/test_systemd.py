"""The systemd units (wgpunch/systemd/) and `wgpunch systemd install` (service.py): what each
unit allows, `systemd-analyze verify` on the files as installed, and the command itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import wgpunch
from wgpunch import service

SRC = str(Path(wgpunch.__file__).resolve().parents[1])
NODE, REGISTRY, RENDEZVOUS = "wgpunch-node@.service", "wgpunch-registry@.service", \
    "wgpunch-rendezvous.service"
# Shared by every unit.
HARDENING = {"Type": "notify", "Restart": "on-failure", "NoNewPrivileges": "yes",
             "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes"}


def directives(text: str) -> dict[str, list[str]]:
    """key -> every value it is given, in order (systemd allows a key more than once)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def unit(name: str) -> dict[str, list[str]]:
    return directives(service.render(name, ("/usr/bin/wgpunch",)))


@pytest.mark.parametrize(("name", "caps", "user", "intent"), [
    (NODE, "CAP_NET_ADMIN CAP_NET_RAW", None,
     "root for wireguard-go's 0700 socket; the device and the raw openers"),
    (REGISTRY, "CAP_NET_ADMIN CAP_NET_BIND_SERVICE", None,
     "root for the socket; reading the device, DNS-SD on port 53"),
    (RENDEZVOUS, "", "yes", "no device, ports above 1023: a dynamic user with nothing"),
])
def test_each_unit_allows_only_what_its_daemon_needs(name, caps, user, intent):
    got = unit(name)
    assert got["CapabilityBoundingSet"] == [caps], intent
    assert got["AmbientCapabilities"] == [caps], intent
    assert got.get("DynamicUser", [None]) == [user], intent
    assert "User" not in got, intent
    for key, value in HARDENING.items():
        assert got[key] == [value], (name, key)
    assert "ReadWritePaths" not in got  # connect() to a UAPI socket needs no write access


@pytest.mark.parametrize(("name", "exec_start", "env_file"), [
    (NODE, "/usr/bin/wgpunch node --interface %i $ARGS", "-/etc/wgpunch/%i.env"),
    (REGISTRY, "/usr/bin/wgpunch registry --interface %i $ARGS", "-/etc/wgpunch/%i.env"),
    (RENDEZVOUS, "/usr/bin/wgpunch rendezvous $ARGS", "-/etc/wgpunch/rendezvous.env"),
])
def test_options_come_from_an_optional_env_file_and_its_args(name, exec_start, env_file):
    got = unit(name)
    assert got["ExecStart"] == [exec_start]
    # ARGS is set empty before the file, so that without the file (or without ARGS in it)
    # $ARGS expands to no argument at all.
    assert got["Environment"] == ["ARGS="] and got["EnvironmentFile"] == [env_file]


def test_directories_only_where_a_daemon_writes():
    node, registry, rendezvous = unit(NODE), unit(REGISTRY), unit(RENDEZVOUS)
    # /run/wgpunch: the node's path file and lock, shared by its instances.
    assert node["RuntimeDirectory"] == ["wgpunch"]
    assert node["RuntimeDirectoryPreserve"] == ["yes"]
    # /var/lib/wgpunch: the rendezvous key. Only one unit has it: a DynamicUser= unit's
    # state directory lives under /var/lib/private, which a root unit naming the same
    # directory would move back.
    assert rendezvous["StateDirectory"] == ["wgpunch"]
    assert "StateDirectory" not in registry
    # /var/lib/wgpunch-node: the node's --mesh state, which must outlive a reboot.
    assert node["StateDirectory"] == ["wgpunch-node"]
    assert "RuntimeDirectory" not in registry and "RuntimeDirectory" not in rendezvous


@pytest.mark.parametrize(("words", "want"), [
    (("/usr/bin/wgpunch",), "/usr/bin/wgpunch"),
    (("/opt/wg punch/bin/python3", "-m", "wgpunch"), '"/opt/wg punch/bin/python3" -m wgpunch'),
    (("/opt/100%/wgpunch",), "/opt/100%%/wgpunch"),  # % starts a specifier
    (("/opt/$HOME/wgpunch",), "/opt/$$HOME/wgpunch"),  # $ starts a variable
    (('/opt/a"b/wgpunch',), '"/opt/a\\"b/wgpunch"'),
])
def test_exec_words(words, want):
    assert service.exec_words(words) == want


@pytest.mark.parametrize(("path", "hidden"), [
    ("/root/.venv/bin/wgpunch", "/root"),
    ("/home/me/.local/bin/wgpunch", "/home"),
    ("/tmp/venv/bin/wgpunch", "/tmp"),
    ("/opt/wgpunch/bin/wgpunch", None),
    ("/usr/local/bin/wgpunch", None),
    ("/homestead/bin/wgpunch", None),  # a prefix of the name is not the directory
])
def test_hidden_by_sandbox(path, hidden):
    got = service.hidden_by_sandbox(Path(path))
    assert (None if got is None else str(got)) == hidden


def test_install_writes_reports_and_leaves_equal_files_alone(tmp_path):
    words = ("/usr/bin/wgpunch",)
    assert service.install(tmp_path, words, dry_run=True) == [
        f"would write {tmp_path / name}" for name in service.UNITS]
    assert not list(tmp_path.iterdir())
    assert service.install(tmp_path, words) == [f"wrote {tmp_path / n}" for n in service.UNITS]
    for name in service.UNITS:
        text = (tmp_path / name).read_text()
        assert text == service.render(name, words) and "@WGPUNCH@" not in text
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644
    assert service.install(tmp_path, words) == [
        f"unchanged {tmp_path / name}" for name in service.UNITS]
    (tmp_path / NODE).write_text("edited by hand\n")
    assert service.install(tmp_path, words)[1] == f"replaced {tmp_path / NODE}"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(service.UNITS)  # no .tmp left


def wgpunch_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wgpunch", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": SRC})


def test_the_command_writes_units_that_run_this_interpreters_wgpunch(tmp_path):
    done = wgpunch_cli("systemd", "install", "--dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:3] == [f"wrote {tmp_path / name}" for name in service.UNITS]
    assert "  systemctl daemon-reload" in lines
    assert "  systemctl enable --now wgpunch-node@IF.service       # every node" in lines
    start = service.exec_words(service.command())  # the same interpreter as the child's
    assert f"ExecStart runs: {start}" in lines
    node = directives((tmp_path / NODE).read_text())
    assert node["ExecStart"] == [f"{start} node --interface %i $ARGS"]


def test_the_command_refuses_a_missing_directory_in_one_line(tmp_path):
    done = wgpunch_cli("systemd", "install", "--dir", str(tmp_path / "none"))
    assert done.returncode == 1
    assert done.stderr == f"wgpunch: systemd: {tmp_path / 'none'} is no directory\n"


def test_dry_run_prints_the_units_and_writes_nothing(tmp_path):
    done = wgpunch_cli("systemd", "install", "--dir", str(tmp_path), "--dry-run")
    assert done.returncode == 0, done.stderr
    assert not list(tmp_path.iterdir())
    for name in service.UNITS:
        assert f"# {tmp_path / name}\n# {name.replace('@', '@IF')}" in done.stdout


# -- systemd-analyze verify -------------------------------------------------------------------

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed")


def verify(path: Path) -> str:
    """systemd-analyze's whole output for the unit at `path` (a template is checked through
    an instance: only then does it check that ExecStart's program exists)."""
    done = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                          text=True, timeout=60)
    return f"exit {done.returncode}: {done.stdout}{done.stderr}"


@needs_analyze
@pytest.mark.parametrize("instance", ["wgpunch-node@wg0.service",
                                      "wgpunch-registry@wg0.service",
                                      "wgpunch-rendezvous.service"])
def test_systemd_analyze_verify_finds_nothing_to_say(instance, tmp_path):
    service.install(tmp_path, service.command())  # ExecStart: a program that exists
    assert verify(tmp_path / instance) == "exit 0: "


@needs_analyze
def test_verify_would_see_a_mistake(tmp_path):
    # The check above is worth something only if verify speaks up: an unknown directive and
    # a program that does not exist.
    service.install(tmp_path, ("/nonexistent/wgpunch",))
    text = (tmp_path / NODE).read_text().replace("Type=notify", "Type=notify\nTyp=notify")
    (tmp_path / NODE).write_text(text)
    said = verify(tmp_path / "wgpunch-node@wg0.service")
    assert "Unknown key 'Typ'" in said
    assert "/nonexistent/wgpunch is not executable" in said
