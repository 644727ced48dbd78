"""The pure parts of the API's limits: token buckets (ratelimit.py), the connection table and
who a connection is from (connlimit.py), cached identities (auth.py), the client log."""

import ipaddress
import logging

import pytest

from wgpunch.errors import ConfigError
from wgpunch.keys import Key
from wgpunch.registry.auth import Identities
from wgpunch.registry.clientlog import ClientLog
from wgpunch.registry.connlimit import Client, ConnectionTable, Kind, Refusal, classify
from wgpunch.registry.limits import Limits
from wgpunch.registry.ratelimit import RateLimiter
from wgpunch.registry.timings import Timings

A, B = Key(bytes([1]) * 32), Key(bytes([2]) * 32)
ip = ipaddress.ip_address


# -- token buckets ------------------------------------------------------------------------------

def test_take_allows_a_burst_then_one_per_interval_and_refusals_cost_nothing():
    bucket = RateLimiter(burst=2, per_s=0.5)
    assert [bucket.take(A, 0.0) for _ in range(2)] == [0.0, 0.0]
    assert bucket.take(A, 0.0) == 2.0  # a token in 2 s
    assert bucket.take(A, 1.0) == 1.0  # refused ones took nothing: still one at 2 s
    assert bucket.take(B, 1.0) == 0.0  # a bucket per key
    assert bucket.take(A, 2.0) == 0.0
    assert bucket.take(A, 100.0) == 0.0 and bucket.take(A, 100.0) == 0.0  # full, not more
    assert bucket.take(A, 100.0) == 2.0


def test_reserve_borrows_from_the_future_and_says_how_long_to_wait():
    pace = RateLimiter(burst=2, per_s=10.0)
    waits = [pace.reserve(A, 0.0) for _ in range(5)]
    assert waits == pytest.approx([0.0, 0.0, 0.1, 0.2, 0.3])
    assert pace.reserve(A, 0.5) == pytest.approx(0.0)  # the debt was paid by 0.4 s
    assert pace.reserve(B, 0.0) == 0.0


def test_buckets_left_full_are_swept_once_there_are_many():
    bucket = RateLimiter(burst=1, per_s=1.0)
    for n in range(5000):
        bucket.take(n, float(n) / 1000)  # keys older than 1 s are full again
    assert len(bucket._buckets) < 4200


# -- the connection table -----------------------------------------------------------------------

def caller(key: Key) -> Client:
    return Client(Kind.CALLER, key, ip("10.0.0.1"))


def stranger(address: str) -> Client:
    return Client(Kind.STRANGER, ip(address), ip(address))


def test_the_table_caps_each_caller_each_source_and_all_strangers():
    table = ConnectionTable(Limits(caller_connections=2, source_connections=1,
                                   stranger_connections=2))
    slots = [table.admit(caller(A)), table.admit(caller(A))]
    assert isinstance(table.admit(caller(A)), Refusal)
    assert not isinstance(table.admit(caller(B)), Refusal)
    s1 = table.admit(stranger("192.0.2.1"))
    assert isinstance(table.admit(stranger("192.0.2.1")), Refusal)  # per source
    s2 = table.admit(stranger("192.0.2.2"))
    refusal = table.admit(stranger("192.0.2.3"))  # all strangers
    assert isinstance(refusal, Refusal) and "no peer's open, at most 2" in refusal.reason
    for slot in (slots[0], slots[0], s1):  # release is idempotent
        slot.release()
    assert not isinstance(table.admit(caller(A)), Refusal)
    assert not isinstance(table.admit(stranger("192.0.2.3")), Refusal)
    assert table.open == 5 and table.count(A) == 2 and s2 is not None


def test_a_full_table_calls_back_when_a_place_frees_up():
    table = ConnectionTable(Limits())
    table.capacity = 2
    slots = [table.admit(caller(A)), table.admit(caller(B))]
    assert table.full and isinstance(table.admit(caller(A)), Refusal)
    woken: list[str] = []
    table.when_room(lambda: woken.append("listener"))
    slots[0].release()
    slots[1].release()
    assert woken == ["listener"]  # once
    assert not table.full


@pytest.mark.parametrize(("intent", "source", "local", "want"), [
    ("a peer's tunnel address", "10.0.0.1", "10.0.0.254", Kind.CALLER),
    ("this host: the address it connected to", "10.0.0.254", "10.0.0.254", Kind.LOCAL),
    ("anyone else", "192.0.2.7", "10.0.0.254", Kind.STRANGER),
    ("loopback to a tunnel address is no exception", "127.0.0.1", "10.0.0.254",
     Kind.STRANGER),
])
def test_classify(intent, source, local, want):
    got = classify(ip(source), ip(local), lambda a: A if a == ip("10.0.0.1") else None)
    assert got.kind is want, intent
    assert got.key == (A if want is Kind.CALLER else ip(source)), intent


class Table:
    def __init__(self) -> None:
        self.roster_revision = 1
        self.peers: dict = {}
        self.scans = 0

    def add(self, key: Key, net: str) -> None:
        class Row:
            public_key = key
            allowed_ips = (ipaddress.ip_network(net),)
        self.peers[key] = Row()
        self.roster_revision += 1


def test_identities_are_cached_until_the_roster_revision_moves():
    table = Table()
    table.add(A, "10.0.0.1/32")
    identities = Identities(table)
    assert identities(ip("10.0.0.1")) == A
    table.peers.clear()  # a change without a roster revision: the cache still answers
    assert identities(ip("10.0.0.1")) == A
    table.add(B, "10.0.0.0/24")
    assert identities(ip("10.0.0.1")) == B  # the roster revision moved: asked again
    assert identities(ip("10.0.1.1")) is None


# -- settings and the client log ----------------------------------------------------------------

@pytest.mark.parametrize("bad", [{"caller_connections": 0}, {"report_per_s": -1.0},
                                 {"max_headers": True}])
def test_limits_must_be_positive_numbers(bad):
    with pytest.raises(ConfigError, match="must be a positive number"):
        Limits(**bad)


def test_timings_of_the_connections_must_be_positive_too():
    with pytest.raises(ConfigError, match="head_timeout_s"):
        Timings(head_timeout_s=0)


def test_the_client_log_keeps_one_line_per_client_and_kind_and_a_budget_per_kind(caplog):
    now = [0.0]
    clog = ClientLog(logging.getLogger("wgpunch.test"), 60.0, 2, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="wgpunch.test"):
        for source in ["a", "a", "b", "c", "d"]:
            clog.log(source, "refused %s", source, event="forbidden")
        clog.log("a", "slow %s", "a", event="slow_request")  # another kind: its own budget
        now[0] = 61.0
        clog.log("e", "refused %s", "e", event="forbidden")
    assert [r.getMessage() for r in caplog.records] == [
        "refused a", "refused b", "slow a", "refused e (2 more like it not logged)"]
    assert [(r.event, r.source) for r in caplog.records][-1] == ("forbidden", "e")
