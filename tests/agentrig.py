"""The node agent's test rig: the real agent in the test's event loop, with a fake registry
(an in-memory watch stream that records punch requests and reports), a real wireguard-go
device pair in throwaway network namespaces (tests/wgpair.py), and senders (NAT openers, path
probes, address look-ups, the TTL measurement) that only record. Used by test_node_agent.py,
test_node_metrics.py and test_node_mesh.py; import the fixtures (`pair`, `registry`, `io`,
`agent_logs`) into a test module to use them there.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from polling import poll
from wgpair import PORT, Side, unique_prefix, wg_pair
from wgpunch.errors import ApiError
from wgpunch.keys import Key, generate_keypair
from wgpunch.lab.netns import Namespace
from wgpunch.node import pathfile
from wgpunch.node.agent import Agent
from wgpunch.node.follow import RegistryTimings
from wgpunch.node.timings import Timings
from wgpunch.protocol import (
    Event,
    PeerEvent,
    PeerRecord,
    PunchEvent,
    RelayEvent,
    Reported,
    Snapshot,
)
from wgpunch.wg import open_device
from wgpunch.wg.model import Endpoint, IPAddress, IPInterface, PeerState

T = TypeVar("T")

# Short enough that a test takes a fraction of a second per round; the decisions are the same.
FAST = Timings(first_retry_s=0.1, max_retry_s=0.4, coalesce_s=0.1, peer_grace_s=0.2,
               probe_timeout_s=0.3, idle_recheck_s=0.1, busy_recheck_s=0.02)
FAST_REGISTRY = RegistryTimings(reconnect_first_s=0.1, reconnect_fast_max_s=0.4,
                                reconnect_max_s=0.4)
LAN_ADDRESS = ipaddress.ip_address("10.0.0.9")  # what peers "report"; not the endpoint: NATed
OUR_INTERFACES = [ipaddress.ip_interface("192.168.1.10/24")]  # what the fake says we have
OUR_ADDRESSES = [i.ip for i in OUR_INTERFACES]
REGISTRY_ENDPOINT = Endpoint.parse("192.0.2.254:51820")  # nobody there
MEASURED_TTL = 2


# -- the fakes ---------------------------------------------------------------------------------


class FakeRegistry:
    """A `Source`: the test pushes watch-stream items (or an ApiError, which ends the stream);
    it records watches, punch requests and reports, in order, in `calls`."""

    coordinates_punches = True

    def __init__(self) -> None:
        self.stream: asyncio.Queue[Event | ApiError] = asyncio.Queue()
        self.calls: list[tuple[str, Any]] = []
        self.watch_times: list[float] = []
        self.delivered = 0  # stream items the agent has taken
        self.records: dict[Key, PeerRecord] = {}
        self.revision = 0
        # With a value: answer each punch request with a punch event saying that.
        self.answer_punches: bool | None = None
        self.punch_error: ApiError | None = None
        self.report_error: ApiError | None = None
        self.failed_lookups: set[Key] = set()

    @property
    def following(self) -> str:
        return "fake registry"

    def of(self, kind: str) -> list[Any]:
        return [what for name, what in self.calls if name == kind]

    # -- what the test does ---------------------------------------------------------------------

    def push(self, item: Event | ApiError) -> None:
        self.stream.put_nowait(item)

    def snapshot_of(self, *records: PeerRecord, epoch: str = "e1") -> Snapshot:
        self.revision += 1
        self.records = {r.public_key: r for r in records}
        return Snapshot(epoch, self.revision, records)

    def publish(self, *records: PeerRecord, epoch: str = "e1") -> None:
        self.push(self.snapshot_of(*records, epoch=epoch))

    def change(self, record: PeerRecord) -> None:
        self.revision += 1
        self.records[record.public_key] = record
        self.push(PeerEvent(self.revision, record))

    def punch_event(self, peer: Key, *, initiator: bool) -> None:
        endpoint = self.records[peer].endpoint
        assert endpoint is not None
        self.push(PunchEvent(self.revision, peer, endpoint, initiator))

    # -- the Source protocol --------------------------------------------------------------------

    async def watch(self, since: int | None, epoch: str | None) -> AsyncIterator[Event]:
        self.calls.append(("watch", (since, epoch)))
        self.watch_times.append(asyncio.get_running_loop().time())
        while True:
            item = await self.stream.get()
            if isinstance(item, ApiError):
                raise item
            self.delivered += 1
            yield item

    async def snapshot(self) -> Snapshot:
        return Snapshot("e1", self.revision, tuple(self.records.values()))

    async def punch(self, peer: Key) -> None:
        self.calls.append(("punch", peer))
        if self.punch_error is not None:
            raise self.punch_error
        if self.answer_punches is not None:
            self.punch_event(peer, initiator=self.answer_punches)

    async def opened(self, peer: Key) -> None:
        self.calls.append(("opened", peer))

    async def relay(self, peer: Key) -> RelayEvent:
        self.calls.append(("relay", peer))
        raise ApiError("registry: no relay here")  # as a registry run without --relay

    async def direct(self, peer: Key, endpoint: Endpoint, peer_endpoint: Endpoint) -> None:
        self.calls.append(("direct", peer))
        raise ApiError("registry: no relay here")

    async def report_self(self, report: Reported) -> None:
        self.calls.append(("report", (report, self.delivered)))
        if self.report_error is not None:
            raise self.report_error

    def lookup_failed(self, peer: Key) -> bool:
        return peer in self.failed_lookups

    async def close(self) -> None:
        pass


@dataclass
class FakeIo:
    """The agent's senders, recording instead of sending. With `answer_from`, a probe is
    answered: a ping from that namespace through the tunnel, as a real probe would raise the
    peer's rx counter."""

    raw: bool = True
    answer_from: Namespace | None = None
    addresses: list[IPInterface] = field(default_factory=lambda: list(OUR_INTERFACES))
    opened: list[tuple[int, Endpoint, int]] = field(default_factory=list)
    probes: list[tuple[str, IPAddress]] = field(default_factory=list)
    # monotonic, one per probe; not compared: two agents' probes never go at the same instant
    probe_times: list[float] = field(default_factory=list, compare=False)
    address_lookups: list[str] = field(default_factory=list)
    measured_toward: list[ipaddress.IPv4Address] = field(default_factory=list)

    def can_send_raw(self) -> bool:
        return self.raw

    async def open(self, listen_port: int, endpoint: Endpoint, ttl: int) -> bool:
        self.opened.append((listen_port, endpoint, ttl))
        return True

    async def probe(self, ifname: str, address: IPAddress) -> bool:
        self.probes.append((ifname, address))
        self.probe_times.append(time.monotonic())
        if self.answer_from is not None:
            ping = await asyncio.create_subprocess_exec(
                *self.answer_from.argv(["ping", "-n", "-c", "1", "-W", "1", str(address)]),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            await ping.wait()
        return True

    async def local_addresses(self, ifname: str) -> list[IPInterface]:
        self.address_lookups.append(ifname)
        return list(self.addresses)

    async def opener_hops(self, toward: ipaddress.IPv4Address) -> int | None:
        self.measured_toward.append(toward)
        return MEASURED_TTL


class SkipClock:
    """Real time plus an offset the test moves forward (`skip`): the device's handshake
    times are real, so the agent's clock must stay comparable with them."""

    def __init__(self) -> None:
        self.offset = 0.0

    def wall(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def skip(self, seconds: float) -> None:
        self.offset += seconds


# -- the device and its peers ------------------------------------------------------------------


@dataclass
class Pair:
    """a (the agent's device) and b, each other's peer, on a veth link; a also has the
    registry's peer (with an endpoint nobody answers at) and a stranger the registry does
    not know (no endpoint)."""

    a: Side
    b: Side
    registry: Key
    stranger: Key
    tmp: Path

    @property
    def b_endpoint(self) -> Endpoint:
        return Endpoint.parse(f"{self.b.veth_ip}:{PORT}")

    def record(self, key: Key, endpoint: Endpoint | None, *, reported: bool = True
               ) -> PeerRecord:
        return PeerRecord(key, (), endpoint, None,
                          Reported(PORT, (LAN_ADDRESS,), "test") if reported else None, 0)

    def records(self, *, b_reported: bool = True) -> tuple[PeerRecord, ...]:
        """The registry's records: a itself, b, and the registry's own peer."""
        return (self.record(self.a.public, Endpoint.parse(f"198.51.100.1:{PORT}")),
                self.record(self.b.public, self.b_endpoint, reported=b_reported),
                self.record(self.registry, REGISTRY_ENDPOINT))

    async def peer(self, key: Key) -> PeerState:
        found = (await self.a.device.state()).peer(key)
        assert found is not None
        return found

    def paths(self) -> dict[str, pathfile.PeerPath]:
        return pathfile.read(self.a.ifname, self.tmp)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    """As tests/wgpair.py builds it (namespaces `agXXXX-a`/`-b`), plus a's two other peers;
    everything removed on the way out, whatever the test did."""
    with wg_pair(tmp_path, unique_prefix("ag")) as (a, b):
        registry, stranger = generate_keypair()[1], generate_keypair()[1]
        a.wg_set("peer", registry.base64(), "allowed-ips", "10.77.0.254/32",
                 "endpoint", str(REGISTRY_ENDPOINT))
        a.wg_set("peer", stranger.base64(), "allowed-ips", "10.77.0.3/32")
        yield Pair(a, b, registry, stranger, tmp_path)


# -- running the agent -------------------------------------------------------------------------


class Running:
    """`agent.run()` as a task of this event loop, stopped on the way out (with everything
    it started); a test's waits fail at once, with its exception, if the agent died."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Running:
        self.task = asyncio.create_task(self.agent.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        pending = [self.task, *self.agent.actor.tasks]
        for task in pending:
            task.cancel()
        results = await asyncio.gather(*pending, return_exceptions=True)
        if exc[0] is None:
            for result in results:
                if isinstance(result, Exception):
                    raise result

    def alive(self) -> None:
        assert self.task is not None
        if self.task.done():
            self.task.result()  # raises what killed it
            raise AssertionError("the agent stopped")

    async def until(self, check: Callable[[], T | Awaitable[T]], *, within_s: float = 5.0,
                    what: str) -> T:
        return await poll(check, within_s=within_s, what=what, alive=self.alive)

    async def holds(self, check: Callable[[], Any], *, duration: float) -> bool:
        """Whether `check()` stays true for `duration` s: the bound of a negative claim."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + duration
        while loop.time() < deadline:
            self.alive()
            value = check()
            if inspect.isawaitable(value):
                value = await value
            if not value:
                return False
            await asyncio.sleep(0.02)
        return True


def agent_for(pair: Pair, registry: FakeRegistry, io: FakeIo, **kwargs: Any) -> Agent:
    kwargs = {"timings": FAST, "registry_timings": FAST_REGISTRY, "state_dir": pair.tmp,
              **kwargs}
    device = kwargs.pop("device", None) or open_device(pair.a.ifname)
    return Agent(device, pair.registry, registry, io=io, **kwargs)


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == name]


@pytest.fixture
def registry() -> FakeRegistry:
    return FakeRegistry()


@pytest.fixture
def io() -> FakeIo:
    return FakeIo()


@pytest.fixture(autouse=True)
def agent_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="wgpunch")
