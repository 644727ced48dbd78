"""sd_notify (sdnotify.py): datagrams to a real unix socket, path and abstract, and the
daemons' READY=1 / STOPPING=1 from real `wgpunch rendezvous` and `wgpunch registry`
processes on loopback (neither needs a WireGuard device to serve)."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import wgpunch
from ports import free_port
from wgpunch import sdnotify

SRC = str(Path(wgpunch.__file__).resolve().parents[1])


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket as systemd's notify socket is, and its NOTIFY_SOCKET value."""
    path = tmp_path / "notify"
    assert len(str(path)) < 100, "sun_path holds 108 bytes"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(10.0)  # each wait below is bounded by it
        yield sock, str(path)


def test_sends_the_fields_as_one_datagram(receiver):
    sock, path = receiver
    assert sdnotify.notify("READY=1", "STATUS=serving", environ={"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving"


def test_an_address_with_at_is_abstract():
    name = f"@wgpunch-test-{secrets.token_hex(4)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name[1:])
        sock.settimeout(10.0)
        assert sdnotify.notify("STOPPING=1", environ={"NOTIFY_SOCKET": name})
        assert sock.recv(4096) == b"STOPPING=1"


@pytest.mark.parametrize(("value", "intent"), [
    ("", "not under systemd (set but empty): nothing to do, silently"),
    (None, "not under systemd: nothing to do, silently"),
])
def test_without_the_variable_nothing_is_sent(value, intent, caplog):
    environ = {} if value is None else {"NOTIFY_SOCKET": value}
    assert not sdnotify.notify("READY=1", environ=environ), intent
    assert not caplog.records


@pytest.mark.parametrize(("value", "logged", "intent"), [
    ("vsock:2:1234", "is no unix socket", "systemd 255's vsock kind: not spoken, said so"),
    ("/nonexistent/notify", "No such file or directory", "a socket that went away"),
])
def test_a_failure_is_logged_not_raised(value, logged, intent, caplog):
    with caplog.at_level(logging.WARNING, logger="wgpunch.sdnotify"):
        assert not sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": value}), intent
    assert logged in caplog.text


def test_the_process_environment_is_the_default(receiver, monkeypatch):
    sock, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert sdnotify.notify("READY=1")
    assert sock.recv(4096) == b"READY=1"


def daemon_argv(command: str, tmp_path: Path) -> list[str]:
    port = free_port()
    if command == "rendezvous":  # a throwaway key, made at start
        return ["rendezvous", "--listen", f"127.0.0.1:{port}", "--key", str(tmp_path / "key")]
    # The registry serves with no device at all (it logs that it cannot read it).
    return ["registry", "-i", "nosuchwg0", "--listen", f"127.0.0.1:{port}", "--natprobe-port", "0"]


@pytest.mark.parametrize("command", ["rendezvous", "registry"])
def test_a_daemon_says_ready_when_it_serves_and_stopping_on_sigterm(command, receiver,
                                                                    tmp_path):
    sock, path = receiver
    argv = daemon_argv(command, tmp_path)
    port = argv[argv.index("--listen") + 1]
    env = {"PYTHONPATH": SRC, "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "NOTIFY_SOCKET": path}
    proc = subprocess.Popen([sys.executable, "-m", "wgpunch", *argv], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        ready = sock.recv(4096).decode().split("\n")
        assert ready[0] == "READY=1" and port in ready[1], ready
        assert ready[1].startswith("STATUS=serving"), ready
        # READY=1 means serving: the port answers (UDP for the rendezvous, TCP otherwise).
        if command == "registry":
            host, _, number = port.rpartition(":")
            socket.create_connection((host, int(number)), timeout=5).close()
        proc.send_signal(signal.SIGTERM)
        assert sock.recv(4096) == b"STOPPING=1"
        _, stderr = proc.communicate(timeout=10)
        assert proc.returncode == 0, stderr
        assert "Traceback" not in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
