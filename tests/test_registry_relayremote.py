"""Relays on other hosts: the signatures (relayauth.py), a real relay's control API
(relaycontrol.py) on loopback, and the registry's choice between relays (relaypool.py)."""

import asyncio
import json
import socket
from collections.abc import AsyncIterator

import pytest

from test_registry_relay import DATA, INIT, A, B, C, free_ports, recv, udp
from test_registry_relayroute import registry_settings
from wgpunch.cli import build_parser
from wgpunch.errors import ConfigError, RequestRefused
from wgpunch.keys import Key
from wgpunch.registry import cli as registry_cli
from wgpunch.registry import relaycli
from wgpunch.registry.relay import Relay
from wgpunch.registry.relayauth import (
    HEADER,
    Verifier,
    answer_matches,
    read_secret,
    sign_answer,
    sign_request,
)
from wgpunch.registry.relaycontrol import serving, slot_request_from
from wgpunch.registry.relaypool import RelayPool
from wgpunch.registry.relayremote import RemoteRelay
from wgpunch.wg.model import Endpoint

SECRET = b"0123456789abcdef0123456789abcdef"
NOW = 1_800_000_000.0
LOCALHOST = "127.0.0.1"


# -- signatures ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("change", "error", "intent"), [
    ({}, None, "as signed: taken"),
    ({"secret": b"another secret, just as long...."}, "wrong MAC", "another secret"),
    ({"body": b'{"nodes": []}'}, "wrong MAC", "the body changed on the way"),
    ({"path": "/v1/slots?x=1"}, "wrong MAC", "the path changed on the way"),
    ({"method": "GET"}, "wrong MAC", "the method changed on the way"),
    ({"now": NOW + 31}, "more than 30 s from ours", "too old"),
    ({"now": NOW - 31}, "more than 30 s from ours", "from the future"),
    ({"header": None}, "no valid", "no header"),
    ({"header": "t=1,n=00,s=00"}, "no valid", "a header of the wrong form"),
])
def test_a_request_is_taken_only_as_signed(change, error, intent):
    header, nonce = sign_request(change.get("secret", SECRET), "POST", "/v1/slots", b"{}", NOW)
    args = {"header": header, "method": "POST", "path": "/v1/slots", "body": b"{}",
            "now": NOW} | {k: v for k, v in change.items() if k != "secret"}
    verifier = Verifier(SECRET)
    if error is None:
        assert verifier.verify(**args) == nonce, intent
    else:
        with pytest.raises(RequestRefused, match=error) as refused:
            verifier.verify(**args)
        assert refused.value.status == 401, intent


def test_a_request_is_taken_once():
    verifier = Verifier(SECRET)
    header, _nonce = sign_request(SECRET, "POST", "/v1/slots", b"{}", NOW)
    verifier.verify(header, "POST", "/v1/slots", b"{}", NOW)
    with pytest.raises(RequestRefused, match="replayed"):
        verifier.verify(header, "POST", "/v1/slots", b"{}", NOW + 1)


def test_an_answer_is_bound_to_its_request():
    signed = sign_answer(SECRET, "a" * 32, 201, b'{"ports": [1, 2]}')
    assert answer_matches(SECRET, signed, "a" * 32, 201, b'{"ports": [1, 2]}')
    assert not answer_matches(SECRET, signed, "b" * 32, 201, b'{"ports": [1, 2]}')
    assert not answer_matches(SECRET, signed, "a" * 32, 200, b'{"ports": [1, 2]}')
    assert not answer_matches(SECRET, None, "a" * 32, 201, b'{"ports": [1, 2]}')


def test_the_secret_file(tmp_path):
    path = tmp_path / "relay.secret"
    path.write_text("short\n")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="fewer than 32 characters"):
        read_secret(path, "relay")
    path.write_text(SECRET.decode() + "\n")
    assert read_secret(path, "relay") == SECRET


def test_slot_requests_are_read_strictly():
    good = {"nodes": [{"key": A.base64(), "ip": "192.0.2.1"},
                      {"key": B.base64(), "ip": "2001:db8::1"}]}
    assert slot_request_from(good) == ((A, "192.0.2.1"), (B, "2001:db8::1"))
    for bad in ({"nodes": good["nodes"][:1]}, good | {"x": 1},
                {"nodes": [good["nodes"][0], {"key": B.base64(), "ip": "relay.example"}]},
                {"nodes": [good["nodes"][0], {"key": B.base64()}]}):
        with pytest.raises(ValueError):
            slot_request_from(bad)


# -- a relay's control API and the pool, on loopback ----------------------------------------------


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        return sock.getsockname()[1]


class Host:
    """A relay host: the relay and its control API (what `wgpunch relay --control` runs)."""

    def __init__(self) -> None:
        self.ips: dict[Key, str] = {}
        self.relay = Relay(self.ips.get, ports=free_ports(6), host=LOCALHOST)
        self.control = Endpoint.parse(f"{LOCALHOST}:{free_tcp_port()}")


@pytest.fixture
async def host() -> AsyncIterator[Host]:
    host = Host()
    await host.relay.start()
    async with serving(host.relay, SECRET, host.ips, host.control):
        yield host
    await host.relay.close()


@pytest.fixture
async def pools() -> AsyncIterator[list[RelayPool]]:
    made: list[RelayPool] = []
    yield made
    for pool in made:
        await pool.close()


async def started(pools: list[RelayPool], pool: RelayPool) -> RelayPool:
    pools.append(pool)
    await pool.start()
    return pool


async def test_a_slot_on_a_remote_relay_forwards_as_on_the_registrys_own(host, pools):
    pool = await started(pools, RelayPool(None, None, [RemoteRelay(host.control, SECRET)]))
    grant = await pool.allocate(A, LOCALHOST, B, LOCALHOST)
    assert grant.created and str(grant.address) == LOCALHOST
    assert {grant.mine, grant.theirs} == set(host.relay.table.ports[:2])
    assert host.relay.observed(A) == LOCALHOST and host.relay.observed(C) is None
    again = await pool.allocate(B, LOCALHOST, A, LOCALHOST)
    assert (again.mine, again.theirs, again.created) == (grant.theirs, grant.mine, False)
    assert pool.standing(A) == [(B, grant.mine, grant.address)]
    assert pool.standing(C) == []
    # Bound by the nodes' IPs, as the registry gave them; then both ways.
    a, b = udp(LOCALHOST), udp(LOCALHOST)
    a.sendto(INIT, (LOCALHOST, grant.mine))
    b.sendto(INIT, (LOCALHOST, grant.theirs))
    assert await recv(a) == INIT
    b.sendto(DATA, (LOCALHOST, grant.theirs))
    assert await recv(a) == DATA
    a.close()
    b.close()


async def test_a_new_registry_learns_where_pairs_are_relayed(host, pools):
    """After a restart of the registry the remote relay still holds its slots: the new
    registry reads them before it serves, and a node's stream opens with its slot."""
    first = await started(pools, RelayPool(None, None, [RemoteRelay(host.control, SECRET)]))
    grant = await first.allocate(A, LOCALHOST, B, LOCALHOST)
    await first.close()
    pools.remove(first)
    again = await started(pools, RelayPool(None, None, [RemoteRelay(host.control, SECRET)]))
    assert again.standing(B) == [(A, grant.theirs, grant.address)]


async def test_a_pair_that_went_direct_pauses_its_slot_on_the_remote_relay(host, pools):
    """POST /v1/relay/{peer}/direct reaches the relay that holds the slot: it stops
    forwarding, no stream replays it, a new registry does not learn it; asking again resumes
    it."""
    pool = await started(pools, RelayPool(None, None, [RemoteRelay(host.control, SECRET)]))
    grant = await pool.allocate(A, LOCALHOST, B, LOCALHOST)
    assert await pool.pause(A, B) is True
    [slot] = list(host.relay.table)
    assert slot.paused_at is not None
    assert await pool.pause(B, A) is False  # the other side's answer, a moment later
    assert pool.standing(A) == []
    await pool.refresh()
    assert pool.standing(A) == []
    again = await pool.allocate(A, LOCALHOST, B, LOCALHOST)
    assert (again.mine, again.theirs) == (grant.mine, grant.theirs)
    assert slot.paused_at is None


async def test_a_relay_that_fails_is_skipped_for_the_next(host, pools):
    """A relay that does not answer, or answers without our secret, is marked and the next
    one is asked within the same request: the registry's own relay last."""
    dead = RemoteRelay(Endpoint.parse(f"{LOCALHOST}:{free_tcp_port()}"), SECRET)
    stranger = RemoteRelay(host.control, b"not the relay's secret, as long.")
    local = Relay(lambda node: LOCALHOST, ports=free_ports(4), host=LOCALHOST)
    pool = await started(pools, RelayPool(local, None, [dead, stranger]))
    assert not dead.healthy and not stranger.healthy  # the first read, before serving
    assert "without our signature" in (stranger.error or "")
    assert pool.choices((A, B)) == [pool.local, dead, stranger]
    grant = await pool.allocate(A, LOCALHOST, B, LOCALHOST)
    assert grant.address is None and len(local.table) == 1  # the registry's own relay
    assert host.relay.table.free_ports == 6


async def test_new_pairs_go_to_the_least_loaded_relay_and_stay_there(pools):
    hosts = [Host(), Host()]
    for h in hosts:
        await h.relay.start()
    try:
        async with serving(hosts[0].relay, SECRET, hosts[0].ips, hosts[0].control), \
                serving(hosts[1].relay, SECRET, hosts[1].ips, hosts[1].control):
            remotes = [RemoteRelay(h.control, SECRET) for h in hosts]
            pool = await started(pools, RelayPool(None, None, remotes))
            await pool.allocate(A, LOCALHOST, B, LOCALHOST)
            await pool.allocate(A, LOCALHOST, C, LOCALHOST)
            assert [len(h.relay.table) for h in hosts] == [1, 1]
            await pool.allocate(C, LOCALHOST, A, LOCALHOST)  # the pair's relay, again
            assert [len(h.relay.table) for h in hosts] == [1, 1]
    finally:
        for h in hosts:
            await h.relay.close()


async def test_unsigned_requests_get_nothing(host):
    reader, writer = await asyncio.open_connection(LOCALHOST, host.control.port)
    body = json.dumps({"nodes": [{"key": A.base64(), "ip": LOCALHOST},
                                 {"key": B.base64(), "ip": LOCALHOST}]}).encode()
    writer.write(b"POST /v1/slots HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                 b"Connection: close\r\n\r\n%s" % (len(body), body))
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 401") and b"\r\n" + HEADER.encode() + b":" not in answer
    assert len(host.relay.table) == 0


# -- options ------------------------------------------------------------------------------------


def test_remote_relay_options(tmp_path):
    assert registry_settings().remote_relays is None
    given = registry_settings("--relay-remote", "192.0.2.7", "--relay-remote",
                              "[2001:db8::7]:6000", "--relay-secret-file", "s").remote_relays
    assert given is not None and [str(c) for c in given.controls] == [
        "192.0.2.7:51825", "[2001:db8::7]:6000"]
    relay = relaycli.settings_from(build_parser().parse_args(
        ["relay", "--control", "192.0.2.7", "--secret-file", str(tmp_path / "s")]))
    assert relay.control is not None and str(relay.control.listen) == "192.0.2.7:51825"
    assert relaycli.settings_from(build_parser().parse_args(["relay"])).control is None


@pytest.mark.parametrize(("argv", "error"), [
    (["registry", "--interface", "wg0", "--relay-remote", "192.0.2.7"],
     "--relay-remote needs --relay-secret-file"),
    (["registry", "--interface", "wg0", "--relay-secret-file", "s"],
     "--relay-secret-file needs --relay-remote"),
    (["registry", "--interface", "wg0", "--relay-remote", "relay.example",
      "--relay-secret-file", "s"], "'relay.example'"),
    (["relay", "--control", "192.0.2.7"], "--control needs --secret-file"),
    (["relay", "--secret-file", "s"], "--secret-file needs --control"),
])
def test_remote_relay_option_errors(argv, error):
    args = build_parser().parse_args(argv)
    read = registry_cli.settings_from if argv[0] == "registry" else relaycli.settings_from
    with pytest.raises(ConfigError, match=error):
        read(args, **({"environ": {}} if argv[0] == "registry" else {}))
