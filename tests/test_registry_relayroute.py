"""`POST /v1/relay/{peer}` over real sockets on loopback (the API as test_registry_api.py
serves it), with a real relay behind it."""

import ipaddress
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from test_registry_api import A, B, C, Registry, next_line, start, table
from test_registry_relay import free_ports
from wgpunch.cli import build_parser
from wgpunch.errors import ConfigError
from wgpunch.registry import cli as registry_cli
from wgpunch.registry import relayroute
from wgpunch.registry.api import create_app
from wgpunch.registry.relay import Relay
from wgpunch.registry.serve import RelaySettings
from wgpunch.registry.site import ApiSite
from wgpunch.registry.state import RegistryState
from wgpunch.registry.timings import Timings

QUIET = Timings(heartbeat_s=30.0, punch_coalesce_s=30.0)


async def serve(relay_address: str | None = None) -> tuple[Registry, Relay]:
    state = RegistryState(epoch="e1")
    state.observe(table())
    relay = Relay(relayroute.observed_ip(state), ports=free_ports(4), host="127.0.0.1")
    address = None if relay_address is None else ipaddress.ip_address(relay_address)
    app = create_app(state, timings=QUIET)
    relayroute.install(app, relay, address)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = ApiSite(runner, "127.0.0.1", 0)
    await site.start()
    return Registry(state, runner, site), relay


@pytest.fixture
async def registry() -> AsyncIterator[tuple[Registry, Relay]]:
    reg, relay = await serve()
    yield reg, relay
    await reg.close()


async def test_a_slot_for_a_pair_reaches_both_sides(registry):
    reg, relay = registry
    a, b = await reg.client(), await reg.client("127.0.0.2")
    watch_b = await b.get("/v1/watch")
    assert (await next_line(watch_b))["type"] == "snapshot"
    resp = await a.post(f"/v1/relay/{B.hex()}")
    mine = await resp.json()
    assert resp.status == 201 and (mine["peer"], mine["address"]) == (B.base64(), None)
    theirs = await next_line(watch_b)
    assert (theirs["type"], theirs["peer"], theirs["address"]) == ("relay", A.base64(), None)
    assert {mine["port"], theirs["port"]} == set(relay.table.ports[:2])
    assert relay.observed(A) == "198.51.100.1" and relay.observed(B) == "203.0.113.2"
    # Asked again (either side): the same slot, and the other side hears it again.
    again = await b.post(f"/v1/relay/{A.base64()}", json={})
    assert (again.status, (await again.json())["port"]) == (200, theirs["port"])
    assert len(relay.table) == 1


async def test_a_stream_opened_after_the_push_starts_with_the_slot(registry):
    """B's stream was down when A asked (a registry restart): its next stream, snapshot or
    resumed, starts with the slot B holds; A's too, and a node without a slot gets none."""
    reg, relay = registry
    a, b = await reg.client(), await reg.client("127.0.0.2")
    mine = await (await a.post(f"/v1/relay/{B.hex()}")).json()
    for since in ("", f"?since={reg.state.revision}&epoch=e1"):
        watch_b = await b.get(f"/v1/watch{since}")
        if not since:
            assert (await next_line(watch_b))["type"] == "snapshot"
        theirs = await next_line(watch_b)
        assert (theirs["type"], theirs["peer"], theirs["address"]) == ("relay", A.base64(), None)
        assert {mine["port"], theirs["port"]} == set(relay.table.ports[:2])
        watch_b.close()
    watch_a = await a.get(f"/v1/watch?since={reg.state.revision}&epoch=e1")
    assert (await next_line(watch_a))["port"] == mine["port"]
    assert reg.state.standing is not None and list(reg.state.standing(C)) == []


@pytest.mark.parametrize(("source", "target", "status", "error"), [
    ("127.0.0.1", A.hex(), 400, "relay: a node cannot relay itself"),
    ("127.0.0.1", C.hex(), 409, "relay: the registry observes no endpoint for"),
    ("127.0.0.1", bytes(32).hex(), 404, "relay: no peer"),
    ("127.0.0.1", "nonsense", 400, "peer key in path"),
])
async def test_refusals(registry, source, target, status, error):
    reg, relay = registry
    resp = await (await reg.client(source)).post(f"/v1/relay/{target}")
    assert resp.status == status and error in (await resp.json())["error"]
    assert len(relay.table) == 0


@pytest.mark.parametrize(("path", "route"), [
    (f"/v1/punch/{B.hex()}", "POST /v1/punch"),
    (f"/v1/punch/{B.hex()}/opened", "POST /v1/punch/{peer}/opened"),
    (f"/v1/relay/{B.hex()}", "POST /v1/relay"),
])
async def test_the_routes_that_name_a_peer_take_nothing_else(registry, path, route):
    """The three requests whose peer is in the path (registry/request.py peer_in_path)."""
    reg, _relay = registry
    a = await reg.client()
    resp = await a.post(path, json={"peer": A.base64()})
    assert (resp.status, (await resp.json())["error"]) == (
        400, f"body: {route} takes no fields")
    resp = await a.post(path + "?peer=x")
    assert resp.status == 400 and "peer" in (await resp.json())["error"]
    resp = await a.post(path, json={})  # an empty object is no body
    assert resp.status in (200, 201, 202), await resp.json()


async def test_the_configured_address_is_handed_out():
    reg, _relay = await serve("192.0.2.1")
    try:
        resp = await (await reg.client()).post(f"/v1/relay/{B.hex()}")
        assert (await resp.json())["address"] == "192.0.2.1"
    finally:
        await reg.close()


async def test_a_registry_without_relay_has_no_such_path():
    state = RegistryState(epoch="e1")
    state.observe(table())
    reg = await start(state, QUIET)
    try:
        resp = await (await reg.client()).post(f"/v1/relay/{B.hex()}")
        assert resp.status == 404
    finally:
        await reg.close()


def registry_settings(*args: str, environ: dict[str, str] | None = None):
    parsed = build_parser().parse_args(["registry", "--interface", "wg0", *args])
    return registry_cli.settings_from(parsed, environ=environ or {})


def test_relay_options():
    assert registry_settings().relay is None
    assert registry_settings("--relay").relay == RelaySettings(range(31000, 32000), None, True)
    given = registry_settings("--relay", "40000-40001", "--relay-address", "192.0.2.1",
                              "--relay-userspace").relay
    assert given == RelaySettings(range(40000, 40002), ipaddress.ip_address("192.0.2.1"), False)
    from_env = registry_settings(environ={"WGPUNCH_RELAY": "true",
                                          "WGPUNCH_RELAY_USERSPACE": "yes"}).relay
    assert from_env == RelaySettings(range(31000, 32000), None, False)


@pytest.mark.parametrize(("args", "error"), [
    (["--relay-userspace"], "need --relay"),
    (["--relay", "31000"], "expected FIRST-LAST"),
    (["--relay", "31000-31000"], "at least two ports"),
    (["--relay", "65535-65536"], "within 1-65535"),
    (["--relay", "--relay-address", "relay.example"], "'relay.example' is not an IP address"),
])
def test_relay_option_errors(args, error):
    with pytest.raises(ConfigError, match=error):
        registry_settings(*args)


async def test_a_pair_goes_direct_together_and_the_slot_pauses(registry):
    """A's probe of B was answered: both sides hear where to send, the slot forwards nothing
    until a side asks for it again; B's own answer a moment later pushes nothing more."""
    reg, relay = registry
    a, b = await reg.client(), await reg.client("127.0.0.2")
    await a.post(f"/v1/relay/{B.hex()}")
    watches = [await a.get("/v1/watch"), await b.get("/v1/watch")]
    for watch in watches:  # each stream opens with the slot its node holds
        assert [(await next_line(watch))["type"] for _ in range(2)] == ["snapshot", "relay"]
    body = {"endpoint": "203.0.113.2:51820", "peer_endpoint": "198.51.100.1:40000"}
    resp = await a.post(f"/v1/relay/{B.hex()}/direct", json=body)
    assert (resp.status, await resp.json()) == (202, {"peer": B.base64(), "pushed": True})
    to_a, to_b = await next_line(watches[0]), await next_line(watches[1])
    assert (to_a["type"], to_a["peer"], to_a["endpoint"]) == ("direct", B.base64(),
                                                             "203.0.113.2:51820")
    assert (to_b["type"], to_b["peer"], to_b["endpoint"]) == ("direct", A.base64(),
                                                             "198.51.100.1:40000")
    [slot] = list(relay.table)
    assert slot.paused_at is not None
    # A stream opened now does not replay the paused slot: it would move the node back.
    late = await a.get("/v1/watch")
    assert (await next_line(late))["type"] == "snapshot"
    a_event = await a.post(f"/v1/punch/{B.hex()}")
    assert a_event.status < 300
    assert (await next_line(late))["type"] == "punch"
    again = await b.post(f"/v1/relay/{A.hex()}/direct", json={
        "endpoint": "198.51.100.1:40000", "peer_endpoint": "203.0.113.2:51820"})
    assert (await again.json())["pushed"] is False
    # The direct path failed: asking for the slot again resumes it.
    assert (await a.post(f"/v1/relay/{B.hex()}")).status == 200
    assert slot.paused_at is None


@pytest.mark.parametrize(("body", "status", "error"), [
    ({"endpoint": "192.0.2.9:51820", "peer_endpoint": "198.51.100.1:1"}, 409,
     "endpoint 192.0.2.9:51820 is no address the registry knows of"),
    ({"endpoint": "203.0.113.2:1", "peer_endpoint": "192.0.2.9:1"}, 409,
     "peer_endpoint 192.0.2.9:1 is no address the registry knows of"),
    ({"endpoint": "203.0.113.2:1"}, 400, "takes exactly"),
    ({"endpoint": "203.0.113.2", "peer_endpoint": "198.51.100.1:1"}, 400, "body: endpoint"),
    ({"endpoint": 5, "peer_endpoint": "198.51.100.1:1"}, 400, "body: endpoint"),
])
async def test_going_direct_names_only_the_pairs_own_addresses(registry, body, status, error):
    """No node can make its peer send to an address that is not the caller's."""
    reg, relay = registry
    a = await reg.client()
    await a.post(f"/v1/relay/{B.hex()}")
    resp = await a.post(f"/v1/relay/{B.hex()}/direct", json=body)
    assert resp.status == status and error in (await resp.json())["error"]
    assert all(slot.paused_at is None for slot in relay.table)
