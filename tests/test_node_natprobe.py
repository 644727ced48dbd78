"""node/natprobe.py in process: the probe sequence and its classification against a model
of each lab NAT kind (src/wgpunch/lab/nat.py) and a registry that answers as
registry/natprobe.py does; the lab test (test_natcheck_lab.py) runs the real thing."""

import ipaddress
from dataclasses import dataclass, field

import pytest

from test_protocol_roles import KINDS
from wgpunch.errors import CapabilityError
from wgpunch.keys import Key
from wgpunch.node.natprobe import Measurement, NatWatch, ProbeTimings, classify, measure
from wgpunch.node.view import RegistryView
from wgpunch.protocol import NatBehaviour, PeerEvent, PeerRecord, Snapshot
from wgpunch.protocol.probewire import Ask, Reply, Via, parse_request
from wgpunch.wg.model import Endpoint

REGISTRY = ipaddress.ip_address("192.0.2.2")
SECOND = ipaddress.ip_address("192.0.2.66")
PROBE, ALT = 51822, 51823
INSIDE = ipaddress.ip_address("192.168.1.10")
OUTSIDE = ipaddress.ip_address("198.51.100.2")
FAST = ProbeTimings(wait_s=0.01, tries=2, alt_wait_s=0.01, alt_tries=1)


@dataclass
class ModelNat:
    """What one lab kind does to our WireGuard port's packets, per destination."""

    kind: str
    contacted: set[Endpoint] = field(default_factory=set)
    ports: dict[Endpoint, int] = field(default_factory=dict)

    def outside(self, to: Endpoint) -> Endpoint:
        self.contacted.add(to)
        if self.kind == "public":
            return Endpoint(INSIDE, 51820)
        if self.kind == "symmetric":
            return Endpoint(OUTSIDE, self.ports.setdefault(to, 30000 + len(self.ports)))
        return Endpoint(OUTSIDE, 20001 if self.kind == "eim-port" else 51820)

    def lets_in(self, source: Endpoint) -> bool:
        if self.kind in ("public", "eim-full-cone"):
            return True
        if self.kind == "eim-addr":
            return any(c.ip == source.ip for c in self.contacted)
        return source in self.contacted


class ModelChannel:
    """The registry (probe port, second port, second address) behind the model NAT."""

    def __init__(self, nat: ModelNat, *, alt_port: bool = True, alt_address: bool = True):
        self.nat = nat
        self.alt_port = ALT if alt_port else None
        self.alt_address = SECOND if alt_address else None
        self.sent: list[Endpoint] = []

    async def exchange(self, listen_port, to, payload, sources, accept, wait_s):
        self.sent.append(to)
        request = parse_request(payload)
        seen = self.nat.outside(to)

        def reply(via):
            return Reply(request.txid, via, seen, self.alt_port, self.alt_address).encode()

        out = {to: reply(Via.PROBE_PORT)}
        if to.ip == REGISTRY and request.ask & Ask.ALT_PORT:
            out[Endpoint(REGISTRY, ALT)] = reply(Via.ALT_PORT)
        if to.ip == REGISTRY and request.ask & Ask.ALT_ADDRESS:
            out[Endpoint(SECOND, ALT)] = reply(Via.ALT_ADDRESS)
        return {source: data for source, data in out.items()
                if source in sources and self.nat.lets_in(source) and accept(data)}


@pytest.mark.parametrize("kind", sorted(KINDS))
async def test_every_lab_kind_is_named_as_the_lab_builds_it(kind):
    nat = ModelNat(kind)
    wg_observed = nat.outside(Endpoint(REGISTRY, 51820))
    got = await measure(ModelChannel(nat), 51820, Endpoint(REGISTRY, PROBE), wg_observed,
                        {INSIDE}, FAST)
    assert got.behaviour == KINDS[kind]


async def test_nothing_is_sent_to_the_second_address_so_a_measurement_repeats():
    """A NAT filtering per address would let it in from then on (the module docstring)."""
    nat = ModelNat("eim-addr")
    channel = ModelChannel(nat)
    for _ in range(2):
        got = await measure(channel, 51820, Endpoint(REGISTRY, PROBE),
                            Endpoint(OUTSIDE, 51820), {INSIDE}, FAST)
        assert got.behaviour == KINDS["eim-addr"]
    assert set(channel.sent) == {Endpoint(REGISTRY, PROBE)}


async def test_a_registry_without_second_address_tells_only_port_filtering():
    got = await measure(ModelChannel(ModelNat("eim-full-cone"), alt_address=False), 51820,
                        Endpoint(REGISTRY, PROBE), Endpoint(OUTSIDE, 51820), {INSIDE}, FAST)
    assert got.behaviour == NatBehaviour("endpoint-independent", "not-port-dependent", True)
    assert (got.alt_port_heard, got.alt_address_heard) == (True, None)
    got = await measure(ModelChannel(ModelNat("eim"), alt_address=False, alt_port=False),
                        51820, Endpoint(REGISTRY, PROBE), Endpoint(OUTSIDE, 51820), {INSIDE},
                        FAST)
    assert got.behaviour == NatBehaviour("endpoint-independent", "unknown", True)


class Silent:
    def __init__(self, error=None):
        self.error, self.calls = error, 0

    async def exchange(self, *args):
        self.calls += 1
        if self.error:
            raise self.error
        return {}


@pytest.mark.parametrize("channel", [Silent(), Silent(CapabilityError("no CAP_NET_RAW"))],
                         ids=["no answer", "no raw socket"])
async def test_nothing_measured_is_unknown(channel):
    got = await measure(channel, 51820, Endpoint(REGISTRY, PROBE), None, {INSIDE}, FAST)
    assert got == Measurement(NatBehaviour("unknown", "unknown", None), None, None, None, None)


class BusyOnFiltering(ModelChannel):
    """A registry too busy to answer the filtering request in time (14 nodes starting on 2
    cores): nothing of it comes, from the probe port either."""

    async def exchange(self, listen_port, to, payload, sources, accept, wait_s):
        if parse_request(payload).ask != Ask.NONE:
            return {}
        return await super().exchange(listen_port, to, payload, sources, accept, wait_s)


@pytest.mark.parametrize("kind", ["eim-full-cone", "eim-addr"])
async def test_an_unanswered_filtering_request_is_not_filtering(kind):
    """Only replies missing beside the probe port's own reply are filtering: a request the
    registry did not answer leaves filtering unknown and is measured again (it was called
    address-and-port-dependent, and cone x symmetric pairs went to the relay for good)."""
    watch = NatWatch(BusyOnFiltering(ModelNat(kind)), Endpoint(REGISTRY, PROBE), FAST)
    got = await watch.current(51820, Endpoint(OUTSIDE, 51820), {INSIDE})
    assert got == NatBehaviour("endpoint-independent", "unknown", True)
    assert watch.measured is not None and not watch.measured.settled
    assert watch.again_in() == FAST.again_first_s
    # A try again that the registry answered not at all keeps what the first one knew.
    watch.channel = Silent()
    assert await watch.current(51820, Endpoint(OUTSIDE, 51820), {INSIDE}, again=True) == got
    assert watch.again_in() == 2 * FAST.again_first_s
    watch.channel = ModelChannel(ModelNat(kind))
    assert await watch.current(51820, Endpoint(OUTSIDE, 51820), {INSIDE},
                               again=True) == KINDS[kind]
    assert watch.again_in() is None
    watch.channel = BusyOnFiltering(ModelNat(kind))  # and a settled one is kept likewise
    assert await watch.current(51820, Endpoint(OUTSIDE, 51820), {INSIDE},
                               again=True) == KINDS[kind]


@pytest.mark.parametrize(("intent", "wg", "seen", "mapping", "preserved"), [
    ("our own address: no NAT", None, "192.168.1.10:51820", "none", True),
    ("same port toward both registry ports", "198.51.100.2:51820", "198.51.100.2:51820",
     "endpoint-independent", True),
    ("same other port toward both", "198.51.100.2:20001", "198.51.100.2:20001",
     "endpoint-independent", False),
    ("another port toward the probe port", "198.51.100.2:40000", "198.51.100.2:40001",
     "address-and-port-dependent", False),
    ("another address toward the probe port (a NAT with an address pool)",
     "198.51.100.2:51820", "198.51.100.3:51820", "address-and-port-dependent", True),
    ("nothing to compare with", None, "198.51.100.2:51820", "unknown", True),
])
def test_mapping_table(intent, wg, seen, mapping, preserved):
    def ep(text):
        return None if text is None else Endpoint.parse(text)

    got = classify(51820, {INSIDE}, ep(wg), ep(seen), None, None)
    assert (got.mapping, got.port_preserved) == (mapping, preserved)


async def test_the_watch_measures_again_only_when_the_observed_endpoint_changes():
    nat = ModelNat("eim")
    channel = ModelChannel(nat)
    watch = NatWatch(channel, Endpoint(REGISTRY, PROBE), FAST)
    first = Endpoint(OUTSIDE, 51820)
    assert (await watch.current(51820, first, {INSIDE})) == KINDS["eim"]
    sent = len(channel.sent)
    await watch.current(51820, first, {INSIDE})
    assert len(channel.sent) == sent  # the same mapping: nothing sent
    await watch.current(51820, Endpoint(OUTSIDE, 40000), {INSIDE})
    assert len(channel.sent) > sent


async def test_a_probe_port_that_did_not_answer_is_asked_again_later_and_less_often():
    silent = Silent()
    watch = NatWatch(silent, Endpoint(REGISTRY, PROBE), FAST)
    first = Endpoint(OUTSIDE, 51820)
    assert (await watch.current(51820, first, {INSIDE})).mapping == "unknown"
    delays = [watch.again_in()]
    for _ in range(8):
        await watch.current(51820, first, {INSIDE}, again=True)
        delays.append(watch.again_in())
    assert delays[0] == FAST.again_first_s and delays == sorted(delays)
    assert delays[-1] == FAST.again_max_s
    # Once it answers, no more tries: the behaviour holds until the mapping changes.
    answered = NatWatch(ModelChannel(ModelNat("eim")), Endpoint(REGISTRY, PROBE), FAST)
    assert (await answered.current(51820, first, {INSIDE})) == KINDS["eim"]
    assert answered.again_in() is None


def _record(key, endpoint, revision):
    return PeerRecord(key, (), None if endpoint is None else Endpoint.parse(endpoint), None,
                      None, revision)


async def test_a_new_observed_endpoint_of_our_own_asks_for_a_new_measurement():
    me, other = Key(bytes([1]) * 32), Key(bytes([2]) * 32)
    view = RegistryView()
    view.me = me
    view.apply(Snapshot("e", 1, (_record(me, None, 1), _record(other, "203.0.113.9:1", 1))))
    assert not view.observed_changed.is_set()
    view.apply(PeerEvent(2, _record(me, "198.51.100.2:51820", 2)))
    assert view.observed_changed.is_set()
    view.observed_changed.clear()
    view.apply(PeerEvent(3, _record(other, "203.0.113.9:2", 3)))
    assert not view.observed_changed.is_set()  # another peer's endpoint is no reason
    view.apply(PeerEvent(4, _record(me, "198.51.100.2:40000", 4)))
    assert view.observed_changed.is_set()
