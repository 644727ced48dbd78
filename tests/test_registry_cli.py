"""`wgpunch registry` options (flags, TOML config, listen addresses, token file), and the
process itself on loopback: one-line errors, serving without a device, clean exit on signals."""

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import wgpunch
from ports import free_port, free_ports
from wgpunch.cli import build_parser
from wgpunch.config import read_token
from wgpunch.errors import ConfigError
from wgpunch.registry.cli import settings_from
from wgpunch.registry.listen import parse_listen

SRC = str(Path(wgpunch.__file__).resolve().parents[1])


def settings(*argv: str):
    return settings_from(build_parser().parse_args(["registry", *argv]))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "want"), [
    ("10.99.0.254:51821", "10.99.0.254:51821"),
    ("10.99.0.254", "10.99.0.254:51821"),
    ("[fd99::fe]:8080", "[fd99::fe]:8080"),
    ("fd99::fe", "[fd99::fe]:51821"),
    ("0.0.0.0:51821", "0.0.0.0:51821"),
])
def test_parse_listen(text, want):
    assert str(parse_listen(text)) == want


@pytest.mark.parametrize("text", ["", "registry.example:51821", "10.0.0.1:0", "10.0.0.1:65536",
                                  "10.0.0.1:http", "fd99::fe:51821", "10.0.0.1/24:1", "[::1]"])
def test_parse_listen_refuses(text):
    with pytest.raises(ConfigError, match="listen address"):
        parse_listen(text)


def test_flags_alone():
    got = settings("-i", "wg0", "--listen", "10.0.0.1", "--listen", "[fd00::1]:9",
                   "--listen", "10.0.0.1:51821", "--poll-interval", "0.05")
    assert got.interface == "wg0" and got.poll_interval_s == 0.05 and got.token_file is None
    assert [str(e) for e in got.listen] == ["10.0.0.1:51821", "[fd00::1]:9"]  # deduplicated


def test_defaults():
    got = settings("-i", "wg0")
    assert (got.listen, got.token_file, got.poll_interval_s) == ((), None, 0.2)


def test_config_file_and_flags_win(tmp_path):
    config = write(tmp_path / "registry.toml", 'interface = "wg9"\nlisten = "10.0.0.9:1"\n'
                   'token_file = "token"\npoll_interval = 1\n')
    got = settings("--config", str(config))
    assert (got.interface, [str(e) for e in got.listen], got.token_file, got.poll_interval_s) \
        == ("wg9", ["10.0.0.9:1"], tmp_path / "token", 1.0)
    got = settings("--config", str(config), "-i", "wg0", "--listen", "10.0.0.1:2",
                   "--token-file", "/etc/t", "--poll-interval", "0.5")
    assert (got.interface, [str(e) for e in got.listen], str(got.token_file),
            got.poll_interval_s) == ("wg0", ["10.0.0.1:2"], "/etc/t", 0.5)


@pytest.mark.parametrize(("intent", "config", "flags", "match"), [
    ("no interface anywhere", "", [], "no interface"),
    ("unknown key", 'interface = "wg0"\nport = 1\n', [], "unknown key 'port'"),
    ("not TOML", "interface = ", [], "not valid TOML"),
    ("interface not text", "interface = 1\n", [], "'interface' must be text"),
    ("listen not a list", 'interface = "wg0"\nlisten = 5\n', [], "'listen' must be"),
    ("listen list of numbers", 'interface = "wg0"\nlisten = [5]\n', [], "as text"),
    ("bad listen address", 'interface = "wg0"\nlisten = ["x:1"]\n', [], "listen address"),
    ("poll interval text", 'interface = "wg0"\npoll_interval = "fast"\n', [], "seconds"),
    ("poll interval boolean", 'interface = "wg0"\npoll_interval = true\n', [], "seconds"),
    ("poll interval zero", 'interface = "wg0"\npoll_interval = 0\n', [], "not in"),
    ("poll interval flag nan", 'interface = "wg0"\n', ["--poll-interval", "nan"], "not in"),
    ("poll interval flag too long", 'interface = "wg0"\n', ["--poll-interval", "61"], "not in"),
])
def test_config_errors(tmp_path, intent, config, flags, match):
    path = write(tmp_path / "registry.toml", config)
    with pytest.raises(ConfigError, match=match):
        settings("--config", str(path), *flags)


def dns_of(got) -> tuple:
    dns = got.dns
    self_config = None if dns.self_config is None else (
        None if dns.self_config.endpoint is None else str(dns.self_config.endpoint),
        [str(n) for n in dns.self_config.allowed_ips])
    return [str(e) for e in dns.listen], dns.zone.name.to_text(), self_config


def test_dns_options():
    assert settings("-i", "wg0").dns is None
    assert dns_of(settings("-i", "wg0", "--dns", "5353", "--zone", "Mesh.Internal")) == (
        ["5353"], "mesh.internal.", None)
    got = settings("-i", "wg0", "--dns", "10.0.0.1", "--dns", "[fd00::1]:5353", "--dns",
                   "10.0.0.1:53", "--zone", "mesh.internal.", "--dns-self")
    assert dns_of(got) == (["10.0.0.1:53", "[fd00::1]:5353"], "mesh.internal.", (None, []))
    got = settings("-i", "wg0", "--dns", "53", "--zone", "m.", "--dns-self", "192.0.2.1:51820",
                   "10.0.0.254/32")
    assert dns_of(got)[2] == ("192.0.2.1:51820", ["10.0.0.254/32"])


def test_dns_config_file_and_flags_win(tmp_path):
    config = write(tmp_path / "r.toml", 'interface = "wg0"\ndns = 5353\nzone = "a.example"\n'
                   'dns_self = ["192.0.2.1:51820", "10.0.0.254/32"]\n')
    assert dns_of(settings("--config", str(config))) == (
        ["5353"], "a.example.", ("192.0.2.1:51820", ["10.0.0.254/32"]))
    assert dns_of(settings("--config", str(config), "--dns", "10.0.0.1:53", "--zone", "b.",
                           "--dns-self")) == (["10.0.0.1:53"], "b.", (None, []))
    config = write(tmp_path / "r.toml", 'interface = "wg0"\ndns = ["10.0.0.1:53", 5353]\n'
                   'zone = "a."\ndns_self = true\n')
    assert dns_of(settings("--config", str(config))) == (["10.0.0.1:53", "5353"], "a.",
                                                         (None, []))
    config = write(tmp_path / "r.toml", 'interface = "wg0"\ndns = "5353"\nzone = "a."\n'
                   'dns_self = false\n')
    assert dns_of(settings("--config", str(config)))[2] is None


@pytest.mark.parametrize(("intent", "config", "flags", "match"), [
    ("zone without dns", "", ["--zone", "a."], "need --dns"),
    ("self without dns", "", ["--dns-self"], "need --dns"),
    ("dns without zone", "", ["--dns", "53"], "needs --zone"),
    ("bad dns address", "", ["--dns", "dns.example:53", "--zone", "a."], "DNS address"),
    ("dns port 0", "", ["--dns", "0", "--zone", "a."], "not in 1-65535"),
    ("dns port too big", "", ["--dns", "70000", "--zone", "a."], "not in 1-65535"),
    ("bad zone", "", ["--dns", "53", "--zone", "a..b"], "DNS zone"),
    ("root zone", "", ["--dns", "53", "--zone", "."], "root"),
    ("bad self endpoint", "", ["--dns", "53", "--zone", "a.", "--dns-self", "h:1"], "self"),
    ("dns not a port", "dns = true\nzone = 'a.'\n", [], "'dns' must be"),
    ("dns list of booleans", "dns = [true]\nzone = 'a.'\n", [], "'dns' must list"),
    ("zone not text", "dns = 53\nzone = 5\n", [], "'zone' must be text"),
    ("dns_self a number", "dns = 53\nzone = 'a.'\ndns_self = 1\n", [], "'dns_self' must"),
])
def test_dns_config_errors(tmp_path, intent, config, flags, match):
    path = write(tmp_path / "registry.toml", 'interface = "wg0"\n' + config)
    with pytest.raises(ConfigError, match=match):
        settings("--config", str(path), *flags)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        settings("--config", str(tmp_path / "nope.toml"))


def test_read_token(tmp_path, caplog):
    good = write(tmp_path / "token", "  s3cret\n")
    good.chmod(0o600)
    assert read_token(good) == "s3cret"
    assert not caplog.records
    good.chmod(0o644)
    assert read_token(good) == "s3cret"
    assert "readable by other users" in caplog.text
    for bad in ("", "\n", "two words"):
        with pytest.raises(ConfigError, match="one token"):
            read_token(write(tmp_path / "bad", bad))
    with pytest.raises(ConfigError, match="cannot read token file"):
        read_token(tmp_path / "missing")
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_token(binary)


# -- the process ------------------------------------------------------------------------------

def wgpunch_cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "wgpunch.cli", *argv]


def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(wgpunch_cli(*argv), capture_output=True, text=True, timeout=30,
                          env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}, check=False)


def test_help_explains_every_option():
    done = run_cli("registry", "--help")
    assert done.returncode == 0
    for option in ("--interface", "--listen", "--config", "--token-file", "--poll-interval",
                   "--dns", "--zone", "--dns-self", "interface =", "listen =", "token_file =",
                   "poll_interval =", "dns =", "zone =", "dns_self =", "SIGTERM",
                   "_wireguard._udp.Z PTR"):
        assert option in done.stdout


@pytest.mark.parametrize(("argv", "message"), [
    (["registry"], "wgpunch: registry: no interface"),
    (["registry", "-i", "wg0", "--listen", "nowhere"], "wgpunch: registry: listen address"),
    (["registry", "-i", "wg0", "--config", "/nonexistent.toml"], "cannot read config"),
    (["registry", "-i", "nosuchwg0"], "no interface 'nosuchwg0' in this network namespace"),
    (["registry", "-i", "wg0", "--listen", "127.0.0.1:1", "--token-file", "/nonexistent"],
     "cannot read token file"),
    (["registry", "-i", "wg0", "--natprobe-port", "0", "--natprobe-alt-address", "192.0.2.66"],
     "need the probe port"),
    (["registry", "-i", "wg0", "--natprobe-alt-port", "51823"], "second port is its first"),
    (["registry", "-i", "wg0", "--natprobe-alt-address", "nowhere"],
     "NAT probe address 'nowhere' is not an IP address"),
    (["registry", "-i", "wg0", "--natprobe-port", "70000"], "70000 is not in 0-65535"),
])
def test_errors_are_one_line_and_exit_1(argv, message):
    done = run_cli(*argv)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr


def get_json(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return json.load(resp)
    except OSError:
        return None


def wait_json(url: str, proc: subprocess.Popen, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "exited"
        body = get_json(url)
        if body is not None:
            return body
        assert time.monotonic() < deadline, f"{url} did not answer in {timeout} s"
        time.sleep(0.05)  # poll interval, bounded by the deadline above


def port_is_free(port: int) -> bool:
    """Nothing listens on it, and a new server can bind it (SO_REUSEADDR, as servers do:
    the connections the test made may still be in TIME_WAIT)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        pass
    else:
        return False
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def dns_ask(port: int, wire: bytes, *, tcp: bool = False) -> bytes | None:
    family = socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, family) as sock:
        sock.settimeout(1)
        try:
            sock.connect(("127.0.0.1", port))
            if tcp:
                sock.sendall(len(wire).to_bytes(2, "big") + wire)
                size = int.from_bytes(sock.recv(2), "big")
                data = b""
                while len(data) < size:
                    data += sock.recv(size - len(data))
                return data
            sock.send(wire)
            return sock.recv(65535)
        except OSError:
            return None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serves_dns_and_releases_its_ports_on_signal(sig):
    """DNS-SD with no device: an empty listing over UDP and TCP; both ports free after."""
    import dns.message
    import dns.rcode

    port, dns_port = free_ports(2)
    proc = subprocess.Popen(
        wgpunch_cli("registry", "-i", "nosuchwg0", "--listen", f"127.0.0.1:{port}",
                    "--natprobe-port", "0",  # no UDP on every address of this namespace
                    "--dns", f"127.0.0.1:{dns_port}", "--zone", "mesh.internal",
                    "--dns-self", "192.0.2.1:51820",
                    # Queries from outside the tunnel are answered only where allowed.
                    "--dns-allow", "127.0.0.1/32"),
        env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    try:
        wait_json(f"http://127.0.0.1:{port}/healthz", proc)
        wire = dns.message.make_query("_wireguard._udp.mesh.internal.", "PTR").to_wire()
        deadline = time.monotonic() + 5
        while (reply := dns_ask(dns_port, wire)) is None:
            assert time.monotonic() < deadline, "no DNS answer within 5 s"
            time.sleep(0.05)  # poll interval, bounded by the deadline above
        for got in (reply, dns_ask(dns_port, wire, tcp=True)):
            message = dns.message.from_wire(got)
            assert message.rcode() == dns.rcode.NOERROR and not message.answer
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=10)
        assert proc.returncode == 0, stderr
        assert "DNS-SD for zone mesh.internal. serving on 127.0.0.1" in stderr
        assert "DNS-SD stopped: queries 2, answered 2" in stderr and "Traceback" not in stderr
        assert port_is_free(dns_port)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", dns_port))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_dns_bind_failure_is_one_line():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        busy = taken.getsockname()[1]
        done = run_cli("registry", "-i", "nosuchwg0", "--listen", f"127.0.0.1:{free_port()}",
                       "--natprobe-port", "0", "--dns", f"127.0.0.1:{busy}", "--zone", "m.")
    # The observer has logged its device warning by then; the error is the last line.
    last = done.stderr.splitlines()[-1]
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert last.startswith(f"wgpunch: registry: cannot serve DNS on 127.0.0.1:{busy}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serves_without_a_device_and_exits_0_on_signal(sig):
    """No such WireGuard device: the observer logs (once) and retries, the API serves."""
    port = free_port()
    proc = subprocess.Popen(
        wgpunch_cli("registry", "-i", "nosuchwg0", "--listen", f"127.0.0.1:{port}",
                    "--poll-interval", "0.01", "--natprobe-port", "0"),
        env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    try:
        health = wait_json(f"http://127.0.0.1:{port}/healthz", proc)
        assert (health["ok"], health["peers"], health["revision"]) == (False, 0, 0)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=10)
        assert proc.returncode == 0, stderr
        assert port_is_free(port)
        assert stderr.count("cannot read the device") == 1  # throttled, though ~100 polls ran
        assert f"stopping on {sig.name}" in stderr and "Traceback" not in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(("argv", "message"), [
    (["--dns-allow", "10.0.0.0/8"], "--zone, --dns-self and --dns-allow need --dns"),
    (["--dns", "53", "--zone", "m.", "--dns-allow", "10.0.0.1/8"],
     "DNS allowed network '10.0.0.1/8' is not a network"),
])
def test_dns_allow_refused(argv, message):
    with pytest.raises(ConfigError, match=message):
        settings("-i", "wg0", *argv)


def test_dns_allow_networks():
    got = settings("-i", "wg0", "--dns", "53", "--zone", "m.", "--dns-allow", "192.0.2.0/24",
                   "--dns-allow", "fd00::/8")
    assert got.dns is not None
    assert [str(n) for n in got.dns.allow] == ["192.0.2.0/24", "fd00::/8"]
