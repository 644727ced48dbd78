"""The registry under abuse (issue 17): a real `wgpunch registry` process in a lab, limited to
1,024 open files as most services are, while one client misbehaves.

The lab: `good` and `bad` are nodes (peers of the registry, through real wireguard-go); `out`
is a host outside the tunnel with a route to the registry's tunnel address (via the core
router). `good` measures `GET /v1/peers` (a new connection each, so accepting counts) before
and during the abuse (tests/abuse_client.py, run in `bad` or `out`). Each abuse must leave
`good`'s p99 within a small factor of its baseline and the registry's log a few lines long.

Before the connection limits (registry/site.py, connlimit.py), on this lab: slow requests made
`good`'s requests time out (3 s) and logged ~100 MB; gzip bombs made its p99 0.85 s and bad
gzip logged a traceback per request (3.5 MB); a report flood logged 1.25 MB and pushed
thousands of revisions; 1,100 hoarded streams exhausted the file descriptors like slow requests.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

import wgpunch
from wgpunch.lab.lab import Lab
from wgpunch.lab.netns import wait_for
from wgpunch.lab.scenario import Host, Scenario
from wgpunch.lab.topology import REGISTRY_TUNNEL_IP
from wgpunch.protocol import API_PORT

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(__import__("shutil").which("prlimit") is None,
                       reason="prlimit (util-linux) not installed"),
]

SRC = str(Path(wgpunch.__file__).resolve().parents[1])
CLIENT = str(Path(__file__).with_name("abuse_client.py"))
SCENARIO = Scenario("abuse", (Host("good"), Host("bad"), Host("out", wireguard=False)),
                    description="two nodes and a host outside the tunnel")
OPEN_FILES = 1024  # the usual soft limit (systemd's default for services too)
PROBES = 100  # requests of `good` per measurement: ~5 s at its 20 per second
# p99 during the abuse at most FACTOR times the baseline's. The baseline's floor keeps a lucky
# quiet baseline (this machine is shared) from failing a test: ~6-15 ms measured here alone,
# 23 ms with another suite and benchmarks running beside (which then gave 147 ms during gzip
# bombs from outside). Without the limits the abuse cost 275-3012 ms (module doc): far above.
FACTOR, BASELINE_FLOOR_S = 5.0, 0.030
LOG_MAX_BYTES = 8192  # a few throttled lines per kind of abuse; before: megabytes


@pytest.fixture(scope="module")
def lab(make_module_lab) -> Lab:
    lab = make_module_lab(SCENARIO)
    registry = lab.host("registry")
    # `out` is no peer, but can reach the tunnel address: as a host next to the registry can.
    lab.exec("core", ["ip", "route", "add", f"{REGISTRY_TUNNEL_IP}/32", "via",
                      str(registry.public_ip)])
    return lab


class Registry:
    def __init__(self, proc: subprocess.Popen, log: Path) -> None:
        self.proc, self.log = proc, log

    def log_bytes(self) -> int:
        return self.log.stat().st_size

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def run_client(lab: Lab, host: str, *args: str, timeout: float = 30.0) -> str:
    argv = [sys.executable, CLIENT, *args]
    return lab.exec(host, argv, timeout=timeout).stdout


def health(lab: Lab) -> dict:
    return json.loads(run_client(lab, "good", "health", str(REGISTRY_TUNNEL_IP),
                                 str(API_PORT), "0"))


@contextmanager
def registry(lab: Lab, tmp_path: Path) -> Iterator[Registry]:
    log = tmp_path / "registry.log"
    argv = ["prlimit", f"--nofile={OPEN_FILES}:{OPEN_FILES}", sys.executable, "-m",
            "wgpunch.cli", "registry", "--interface", lab.host("registry").ifname]
    with log.open("w") as out:
        proc = lab.host("registry").ns.popen(argv, env={"PYTHONPATH": SRC},
                                             stdin=subprocess.DEVNULL,
                                             stdout=subprocess.DEVNULL, stderr=out)
    try:
        reg = Registry(proc, log)

        def serving() -> bool:
            assert proc.poll() is None, f"registry exited: {reg.text()}"
            return health(lab).get("peers") == 2

        wait_for(serving, timeout=10, interval=0.1, what="the registry to serve")
        yield reg
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@dataclass
class Probe:
    latencies: list[float]
    errors: list[str]

    @property
    def p99(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[math.ceil(0.99 * len(ordered)) - 1]


def probe(lab: Lab) -> Probe:
    got = json.loads(run_client(lab, "good", "probe", str(REGISTRY_TUNNEL_IP), str(API_PORT),
                                str(PROBES), timeout=PROBES * 3.2))
    return Probe(got["latencies"], got["errors"])


@contextmanager
def abuser(lab: Lab, host: str, mode: str, n: int) -> Iterator[dict[str, int]]:
    """The abuse runs inside the block; the dict is filled with its counts afterwards."""
    argv = [sys.executable, CLIENT, mode, str(REGISTRY_TUNNEL_IP), str(API_PORT), str(n)]
    proc = lab.ns(host).popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    counts: dict[str, int] = {}
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(1.0)  # let it reach full strength: connections opened, caps hit
        yield counts
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=15)
            counts.update(json.loads(out.strip().splitlines()[-1]) if out.strip() else {})
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize(("intent", "host", "mode", "n"), [
    ("1,100 slow requests from a peer: past the open-files limit", "bad", "slow", 1100),
    ("1,100 slow requests from a host outside the tunnel", "out", "slow", 1100),
    ("bad gzip and gzip bombs from a peer, 8 at a time", "bad", "gzip", 8),
    ("bad gzip and gzip bombs from outside the tunnel, 8 at a time", "out", "gzip", 8),
    ("a flood of changing reports from a peer, 8 connections", "bad", "report", 8),
    ("1,100 watch streams hoarded by a peer", "bad", "streams", 1100),
])
def test_an_abusive_client_costs_a_legitimate_node_nothing(lab, tmp_path, intent, host, mode,
                                                            n):
    with registry(lab, tmp_path) as reg:
        baseline = probe(lab)
        revision = health(lab)["revision"]
        logged = reg.log_bytes()
        with abuser(lab, host, mode, n) as counts:
            during = probe(lab)
        grown = reg.log_bytes() - logged
        revisions = health(lab).get("revision", revision) - revision
        print(f"{intent}: good's p99 {baseline.p99 * 1000:.1f} ms -> {during.p99 * 1000:.1f} ms "
              f"(max {max(during.latencies) * 1000:.1f} ms, {len(during.errors)} failed), "
              f"registry log +{grown} bytes, +{revisions} revisions; abuser: {counts}")
        assert not baseline.errors, baseline.errors
        assert not during.errors, (intent, during.errors[:5])
        limit = FACTOR * max(baseline.p99, BASELINE_FLOOR_S)
        assert during.p99 <= limit, (intent, during.p99, baseline.p99)
        assert grown <= LOG_MAX_BYTES, (intent, grown, reg.text()[-2000:])
        assert "Traceback" not in reg.text(), intent
        assert "500" not in counts, (intent, counts)  # no request is an internal error
        if mode == "report":  # the history other nodes resume from is not pushed out
            assert revisions <= 20, (intent, revisions)
        assert reg.proc.poll() is None, intent
