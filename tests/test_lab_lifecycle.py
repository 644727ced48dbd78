"""Labs come and go without traces, side by side, from the API and from the CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from wgpunch.errors import LabError
from wgpunch.lab import catalog, scenario, state
from wgpunch.lab.lab import Lab
from wgpunch.lab.netns import wait_for

pytestmark = pytest.mark.lab

SRC = str(Path(__file__).resolve().parents[1] / "src")
BIG = "mixed-60"  # takes ~2-3 s to build here: long enough to interrupt


def traces(prefix: str) -> dict[str, list[str]]:
    """Everything of lab `prefix` still on the machine."""
    procs = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[:2] == [b"wireguard-go", b"-f"] and argv[2].startswith(f"{prefix}-".encode()):
            procs.append(argv[2].decode())
    return {
        "namespaces": [ns.name for ns in state.namespaces(prefix)],
        "sockets": [s.name for s in state.sockets(prefix)],
        "state": [str(state.state_dir(prefix))] if state.state_dir(prefix).exists() else [],
        "wireguard-go": procs,
    }


def clean(prefix: str) -> bool:
    return not any(traces(prefix).values())


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC}
    done = subprocess.run([sys.executable, "-m", "wgpunch.cli", "lab", *args],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def default_sigint() -> None:
    """In the child, before exec: SIGINT to its default, which Python turns into
    KeyboardInterrupt. A test run started with SIGINT ignored (`nohup ... &`) would hand
    SIG_IGN down, and the child would never see the Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def tunnel_ping(lab: Lab, host: str, target: str) -> bool:
    return lab.exec(host, ["ping", "-c1", "-W1", target], check=False).returncode == 0


def test_two_labs_side_by_side_then_one_goes(make_lab):
    one = make_lab(catalog.resolve("easy"))
    two = make_lab(catalog.resolve("easy"))
    # The same addresses in both, yet each registry answers only its own nodes.
    assert one.host("a").tunnel_ip == two.host("a").tunnel_ip
    for lab in (one, two):
        wait_for(lambda lab=lab: tunnel_ping(lab, "a", "10.99.0.254"), timeout=3,
                 what=f"a -> registry in {lab.prefix}")
    one.close()
    assert clean(one.prefix)
    assert tunnel_ping(two, "a", "10.99.0.254")
    assert not clean(two.prefix)


def test_with_block_tears_down_on_an_exception(lab_prefix):
    prefix = lab_prefix
    with pytest.raises(RuntimeError, match="boom"), Lab(catalog.resolve("easy"), prefix=prefix):
        assert not clean(prefix)
        raise RuntimeError("boom")
    assert clean(prefix)


def test_a_used_prefix_is_refused(make_lab):
    lab = make_lab(catalog.resolve("easy"))
    with pytest.raises(LabError, match="in use"):
        Lab(catalog.resolve("easy"), prefix=lab.prefix).build()
    assert tunnel_ping(lab, "a", "10.99.0.254")  # the refusal touched nothing


def test_impaired_links_delay_and_drop(make_lab):
    lab = make_lab(scenario.from_dict({"site": [
        {"host": "a", "link": {"delay_ms": 20}},
        {"nat": "eim", "hosts": ["b"], "link": {"loss_pct": 100}},
    ]}, default_name="impaired"))
    ping = lab.exec("a", ["ping", "-c2", "-i0.2", "-W2", "192.0.2.2"])
    rtts = [float(rtt) for rtt in re.findall(r"time=([\d.]+) ms", ping.stdout)]
    assert rtts and min(rtts) >= 40  # 20 ms each way
    assert lab.exec("b", ["ping", "-c1", "-W1", "192.0.2.2"], check=False).returncode != 0


def test_cli_up_exec_list_down(lab_prefix):
    prefix = lab_prefix
    try:
        up = cli("up", "easy", "--prefix", prefix, "--json")
        lab = json.loads(up.stdout)
        hosts = {h["name"]: h for h in lab["hosts"]}
        assert hosts["a"]["namespace"] == f"{prefix}-a"
        assert hosts["a"]["interface"] == f"{prefix}-a"
        assert hosts["a"]["nat"] == "eim" and hosts["a"]["public_ip"] == "198.51.100.2"
        assert hosts["registry"]["tunnel_ip"] == "10.99.0.254"
        # Private keys live only in the 0600 configs under the 0700 state directory.
        confs = sorted(state.state_dir(prefix).glob("*.conf"))
        assert len(confs) == 3
        assert state.state_dir(prefix).stat().st_mode & 0o777 == 0o700
        for conf in confs:
            assert conf.stat().st_mode & 0o777 == 0o600
            private = re.search(r"^PrivateKey = (\S+)$", conf.read_text(), re.M).group(1)
            assert private not in up.stdout
        # The CLI has exited; wireguard-go runs on.
        assert sorted(traces(prefix)["wireguard-go"]) == sorted(
            h["interface"] for h in lab["hosts"])
        assert cli("exec", prefix, "a", "--", "sh", "-c", "exit 3", check=False).returncode == 3
        shown = cli("exec", prefix, "registry", "--", "wg", "show", f"{prefix}-reg").stdout
        assert hosts["a"]["public_key"] in shown
        listed = json.loads(cli("list", "--json").stdout)
        assert {"prefix": prefix, "scenario": "easy", "namespaces": 6, "sockets": 3} in listed
        again = cli("up", "easy", "--prefix", prefix, check=False)
        assert again.returncode == 1 and "in use" in again.stderr
    finally:
        down = cli("down", "--prefix", prefix)
    assert "removed 6 namespaces" in down.stdout
    assert clean(prefix)


def test_ctrl_c_during_up_removes_what_was_built(lab_prefix):
    prefix = lab_prefix
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen([sys.executable, "-m", "wgpunch.cli", "lab", "up", BIG,
                             "--prefix", prefix], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=default_sigint)
    try:
        wait_for(lambda: len(state.namespaces(prefix)) > 5, timeout=20, what="the build")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert clean(prefix)
    finally:
        proc.kill()
        state.remove(prefix)


def test_down_removes_a_lab_whose_up_was_killed(lab_prefix):
    prefix = lab_prefix
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen([sys.executable, "-m", "wgpunch.cli", "lab", "up", BIG,
                             "--prefix", prefix], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    try:
        wait_for(lambda: traces(prefix)["wireguard-go"], timeout=30, what="wireguard-go")
        proc.kill()  # no chance to clean up
        proc.wait(timeout=10)
        assert not clean(prefix)
        assert cli("down", "--prefix", prefix).stdout.startswith(f"lab {prefix}: removed")
        assert clean(prefix)
    finally:
        proc.kill()
        state.remove(prefix)


def test_down_removes_what_the_labs_agents_left_in_the_machines_directories(lab_prefix):
    """A killed agent leaves its lock and path file in /run/wgpunch, and `--mesh` its state:
    the lab's, by the prefix of its interfaces' names, go with the lab; nothing else does."""
    from wgpunch.node.mesh import MESH_DIR
    from wgpunch.node.pathfile import STATE_DIR

    STATE_DIR.mkdir(parents=True, exist_ok=True)
    MESH_DIR.mkdir(parents=True, exist_ok=True)
    ours = [STATE_DIR / f"{lab_prefix}-a.lock", STATE_DIR / f"{lab_prefix}-a.json",
            MESH_DIR / f"{lab_prefix}-a.mesh.json"]
    other = STATE_DIR / f"{lab_prefix}x-a.lock"  # another lab whose prefix starts the same
    try:
        for path in [*ours, other]:
            path.write_text("1")
        state.remove(lab_prefix)
        assert [p for p in ours if p.exists()] == [] and other.exists()
    finally:
        for path in [*ours, other]:
            path.unlink(missing_ok=True)


def test_agent_files_go_by_interface_name_outside_a_lab(lab_prefix):
    """A test or bench that runs agents on its own interfaces (tests/wgpair.py, the fleet
    test, bench/agent_footprint.py) removes their files by the interfaces' names."""
    from wgpunch.node.pathfile import STATE_DIR

    STATE_DIR.mkdir(parents=True, exist_ok=True)
    ours = [STATE_DIR / f"{lab_prefix}awg.lock", STATE_DIR / f"{lab_prefix}awg.json"]
    other = STATE_DIR / f"{lab_prefix}awgx.lock"  # another interface whose name starts so
    try:
        for path in [*ours, other]:
            path.write_text("1")
        state.remove_agent_files(f"{lab_prefix}awg")
        assert [p for p in ours if p.exists()] == [] and other.exists()
    finally:
        for path in [*ours, other]:
            path.unlink(missing_ok=True)
