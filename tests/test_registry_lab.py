"""The registry against real wireguard-go (wgpair.py): side B is the registry, side A a node.

`wgpunch registry` runs as a process inside B's namespace; A's requests are made from A's
namespace by a small urllib script, so their source address is what the kernel and WireGuard
make of them: through the tunnel from A's tunnel address, or over the veth from A's own.
"""

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import wgpunch
from wgpair import PORT, Side, wg_pair
from wgpunch.keys import generate_keypair
from wgpunch.lab.netns import wait_for
from wgpunch.registry.observer import Observer
from wgpunch.registry.state import RegistryState
from wgpunch.registry.timings import Timings
from wgpunch.wg import open_device
from wgpunch.wg.model import Endpoint

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(__import__("shutil").which("wireguard-go") is None,
                       reason="wireguard-go not installed"),
]

SRC = str(Path(wgpunch.__file__).resolve().parents[1])
API_PORT = 51821

# One HTTP request; prints {"status": N, "body": ...} or {"status": null, "error": "..."}.
# No proxy: the environment's proxy settings must not reroute requests to tunnel addresses.
FETCH = r"""
import json, sys, urllib.error, urllib.request
method, url = sys.argv[1], sys.argv[2]
data = sys.argv[3].encode() if len(sys.argv) > 3 else None
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
request = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
try:
    with opener.open(request, timeout=3) as resp:
        print(json.dumps({"status": resp.status, "body": json.load(resp)}))
except urllib.error.HTTPError as err:
    print(json.dumps({"status": err.code, "body": json.load(err)}))
except urllib.error.URLError as err:
    print(json.dumps({"status": None, "error": str(err.reason)}))
"""

# Prints "open" once the stream's headers arrived (the registry has registered the stream by
# then), then each line of the stream until a peer event shows the endpoint argv[2].
WATCH = r"""
import json, sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
with opener.open(sys.argv[1], timeout=10) as resp:
    print(json.dumps({"type": "open"}), flush=True)
    for raw in resp:
        line = json.loads(raw)
        print(json.dumps(line), flush=True)
        if line["type"] == "peer" and line["peer"]["endpoint"] == sys.argv[2]:
            break
"""


@pytest.fixture
def pair(tmp_path):
    with wg_pair(tmp_path) as sides:
        yield sides


async def connect(a: Side, b: Side) -> None:
    """A handshakes with B at once; B then observes A's endpoint (A's veth address)."""
    await a.device.handshake_now(b.public, Endpoint.parse(f"{b.veth_ip}:{PORT}"))
    deadline = time.monotonic() + 3.0
    while (await b.device.state()).peer(a.public).endpoint is None:
        assert time.monotonic() < deadline, "B did not see A's endpoint within 3 s"
        await asyncio.sleep(0.01)  # poll interval, bounded by the deadline above


def fetch(side: Side, method: str, url: str, body: str | None = None) -> dict:
    argv = [sys.executable, "-c", FETCH, method, url] + ([body] if body is not None else [])
    return json.loads(side.ns.run(argv).stdout)


class Registry:
    def __init__(self, proc: subprocess.Popen, log: Path) -> None:
        self.proc, self.log = proc, log

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=10)

    def text(self) -> str:
        return self.log.read_text()


@contextmanager
def registry(side: Side, tmp_path: Path, *args: str) -> Iterator[Registry]:
    log = tmp_path / f"registry-{time.monotonic_ns()}.log"
    with log.open("w") as out:
        proc = side.ns.popen(
            [sys.executable, "-m", "wgpunch.cli", "registry", "--interface", side.ifname, *args],
            env={"PYTHONPATH": SRC}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=out)
    try:
        yield Registry(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def wait_serving(reg: Registry, side: Side, url: str) -> dict:
    """Poll `url`/healthz from `side` until the registry answers (or has died)."""
    def answered() -> dict | None:
        assert reg.proc.poll() is None, f"registry exited: {reg.text()}"
        got = fetch(side, "GET", f"{url}/healthz")
        return got if got["status"] == 200 else None
    return wait_for(answered, timeout=10, interval=0.05, what="the registry to serve")


async def test_a_node_is_identified_by_its_tunnel_address_and_sees_its_endpoint(pair, tmp_path):
    a, b = pair
    await connect(a, b)
    tunnel = f"http://{b.tunnel_ip}:{API_PORT}"
    b.ns.run(["ip", "addr", "add", "fd77::2/64", "dev", b.ifname])  # listened on too
    with registry(b, tmp_path) as reg:
        wait_serving(reg, a, tunnel)
        got = fetch(a, "GET", f"{tunnel}/v1/peers")
        assert got["status"] == 200 and got["body"]["you"] == a.public.base64()
        [me] = got["body"]["peers"]
        assert (me["public_key"], me["endpoint"], me["allowed_ips"]) == (
            a.public.base64(), f"{a.veth_ip}:{PORT}", [f"{a.tunnel_ip}/32"])
        assert me["latest_handshake"] is not None

        report = {"listen_port": PORT, "local_addresses": [a.veth_ip], "version": "0.1.0"}
        put = fetch(a, "PUT", f"{tunnel}/v1/self", json.dumps(report))
        assert put["status"] == 200
        assert fetch(a, "GET", f"{tunnel}/v1/peers")["body"]["peers"][0]["reported"] == report

        # By default the API listens on B's tunnel address only: B's veth address refuses.
        outside = fetch(a, "GET", f"http://{b.veth_ip}:{API_PORT}/v1/peers")
        assert outside["status"] is None and "refused" in outside["error"].lower()

        assert reg.stop() == 0
        log = reg.text()
        assert f"peer {a.public} appeared: endpoint {a.veth_ip}:{PORT}" in log
        assert f"node {a.public} reported itself" in log
        assert f"serving on {b.tunnel_ip}:{API_PORT}, [fd77::2]:{API_PORT}," in log
        assert "stopping on SIGTERM" in log
        assert "Traceback" not in log


async def test_a_source_outside_the_tunnel_gets_403(pair, tmp_path):
    a, b = pair
    await connect(a, b)
    with registry(b, tmp_path, "--listen", f"0.0.0.0:{API_PORT}") as reg:
        veth = f"http://{b.veth_ip}:{API_PORT}"
        health = wait_serving(reg, a, veth)  # /healthz answers anyone: it tells only counts
        assert health["body"]["peers"] == 1 and health["body"]["ok"] is True
        refused = fetch(a, "GET", f"{veth}/v1/peers")
        assert refused["status"] == 403
        assert f"source address {a.veth_ip} is not" in refused["body"]["error"]
        fetch(a, "GET", f"{veth}/v1/watch")
        tunnel = fetch(a, "GET", f"http://{b.tunnel_ip}:{API_PORT}/v1/peers")
        assert (tunnel["status"], tunnel["body"]["you"]) == (200, a.public.base64())
        assert reg.stop(signal.SIGINT) == 0
        log = reg.text()
    assert "listening on every address (0.0.0.0:51821)" in log
    assert log.count(f"from {a.veth_ip}: not the tunnel address") == 1  # once per minute


async def test_the_watch_stream_shows_a_roaming_node_within_a_second(pair, tmp_path):
    """A moves to another port; its next packet makes B's WireGuard roam, B's observer (at
    its default 0.2 s interval) sees it, and A's watch stream says so."""
    a, b = pair
    await connect(a, b)
    tunnel = f"http://{b.tunnel_ip}:{API_PORT}"
    with registry(b, tmp_path) as reg:
        health = wait_serving(reg, a, tunnel)["body"]
        url = f"{tunnel}/v1/watch?since={health['revision']}&epoch={health['epoch']}"
        roamed = f"{a.veth_ip}:51999"
        watch = a.ns.popen([sys.executable, "-c", WATCH, url, roamed], stdout=subprocess.PIPE,
                           text=True, env={"PYTHONPATH": SRC})
        try:
            assert watch.stdout is not None
            assert json.loads(watch.stdout.readline()) == {"type": "open"}
            a.wg_set("listen-port", "51999")
            moved = time.monotonic()  # A's next packet (the ping) makes B roam
            a.ns.run(["ping", "-c", "1", "-W", "2", b.tunnel_ip])
            out, _ = watch.communicate(timeout=10)
            elapsed = time.monotonic() - moved
        finally:
            if watch.poll() is None:
                watch.kill()
                watch.wait()
        lines = [json.loads(line) for line in out.splitlines()]
        assert lines and lines[-1]["type"] == "peer", lines
        assert lines[-1]["peer"]["endpoint"] == roamed, lines
        assert elapsed < 1.0, f"the roam took {elapsed:.2f} s to reach the stream"
        print(f"roam → watch stream: {elapsed:.3f} s")
        assert reg.stop() == 0
        assert f"changed endpoint: {a.veth_ip}:{PORT} -> {roamed}" in reg.text()


async def test_a_lost_device_keeps_the_last_table_served(pair, tmp_path):
    a, b = pair
    await connect(a, b)
    veth = f"http://{b.veth_ip}:{API_PORT}"
    with registry(b, tmp_path, "--listen", f"{b.veth_ip}:{API_PORT}",
                  "--poll-interval", "0.02") as reg:
        assert wait_serving(reg, a, veth)["body"]["peers"] == 1
        b.daemon.stop()  # wireguard-go exits; its interface and socket are gone
        wait_for(lambda: fetch(a, "GET", f"{veth}/healthz")["body"]["ok"] is False,
                 timeout=5, interval=0.05, what="the registry to notice the lost device")
        health = fetch(a, "GET", f"{veth}/healthz")["body"]
        assert (health["peers"], health["revision"]) == (1, 1)
        assert reg.stop() == 0
        log = reg.text()
    assert log.count("cannot read the device") == 1  # many failed polls, one line


async def test_observer_reads_the_real_device(pair):
    a, b = pair
    await connect(a, b)
    state = RegistryState()
    observer = Observer(lambda: open_device(b.ifname), state, Timings())
    try:
        assert await observer.poll_once()
        record = state.peers[a.public]
        assert str(record.endpoint) == f"{a.veth_ip}:{PORT}"
        assert [str(n) for n in record.allowed_ips] == [f"{a.tunnel_ip}/32"]
        revision = state.revision
        assert await observer.poll_once() and state.revision == revision  # nothing changed
        # Later reads apply only what changed (Device.changes): a peer added, moved, removed.
        extra = generate_keypair()[1]
        b.wg_set("peer", extra.base64(), "endpoint", "192.0.2.9:1", "allowed-ips",
                 "10.77.0.9/32")
        assert await observer.poll_once() and str(state.peers[extra].endpoint) == "192.0.2.9:1"
        b.wg_set("peer", extra.base64(), "endpoint", "192.0.2.9:2")
        assert await observer.poll_once() and str(state.peers[extra].endpoint) == "192.0.2.9:2"
        b.wg_set("peer", extra.base64(), "remove")
        assert await observer.poll_once() and set(state.peers) == {a.public}
        assert state.revision == revision + 3
        assert str(state.peers[a.public].endpoint) == f"{a.veth_ip}:{PORT}"
    finally:
        await observer.close()
