"""The control API of a relay on its own host (`wgpunch relay --control ADDR:PORT`): how a
registry hands out slots there (docs/api.md, "Remote relays"). HTTP on aiohttp; every request
and answer is signed with the secret both hosts share (relayauth.py), and nothing else is
served.

    POST /v1/slots  {"nodes": [{"key": "base64", "ip": "ip"}, {"key": ..., "ip": ...}]}
        -> 201 (made) or 200 (the pair's slot) {"ports": [N, N]}
        The pair's slot, as Relay.allocate(nodes[0], nodes[1]): the ports each node's device
        sends to, in the request's order; nodes[0]'s side may move when the slot existed.
        `ip` is the node's public IP as the registry observes it: what binds its side.
    GET /v1/slots
        -> 200 {"slots": [{"nodes": ["base64", "base64"], "ports": [N, N]}, ...],
                "free_ports": N}
        Every slot the relay holds (the registry's view of where pairs are relayed, and of
        this relay's load).

The relay binds a side by the IP the registry last gave for its node; a node whose IP
changes loses its path through the slot, asks the registry again, and the registry's
request carries the new IP.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from ..errors import ConfigError, MalformedMessage, RequestRefused
from ..keys import Key
from ..protocol import decode_object, dumps
from ..throttle import Throttle
from ..wg.model import Endpoint
from .relay import Relay
from .relayauth import HEADER, Verifier, sign_answer

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024  # a slot request is ~150 bytes
BODY_TIMEOUT_S = 5.0
RELAY = web.AppKey("relay", Relay)
VERIFIER = web.AppKey("verifier", Verifier)
IPS = web.AppKey("ips", dict[Key, str])
REFUSALS = web.AppKey("refusals", Throttle)  # one log line per source and minute
BODY = web.RequestKey("body", bytes)
NONCE = web.RequestKey("nonce", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- the messages (the registry's side reads and writes them too: relayremote.py) --------------


def slot_request_json(node: Key, node_ip: str, peer: Key, peer_ip: str) -> dict[str, Any]:
    return {"nodes": [{"key": node.base64(), "ip": node_ip},
                      {"key": peer.base64(), "ip": peer_ip}]}


def slot_request_from(obj: dict[str, Any]) -> tuple[tuple[Key, str], tuple[Key, str]]:
    nodes = obj.get("nodes")
    if set(obj) != {"nodes"} or not isinstance(nodes, list) or len(nodes) != 2:
        raise MalformedMessage('body: expected {"nodes": [two nodes]}')
    first, second = (_node(item) for item in nodes)
    return first, second


def pause_request_json(node: Key, peer: Key) -> dict[str, Any]:
    return {"pair": [node.base64(), peer.base64()]}


def pause_request_from(obj: dict[str, Any]) -> tuple[Key, Key]:
    pair = obj.get("pair")
    if set(obj) != {"pair"} or not isinstance(pair, list) or len(pair) != 2 or not all(
            isinstance(k, str) for k in pair):
        raise MalformedMessage('body: expected {"pair": ["base64", "base64"]}')
    return Key.from_base64(pair[0]), Key.from_base64(pair[1])


def _node(item: Any) -> tuple[Key, str]:
    if not isinstance(item, dict) or set(item) != {"key", "ip"} or not all(
            isinstance(v, str) for v in item.values()):
        raise MalformedMessage('body: each node is {"key": "base64", "ip": "ip"}')
    try:
        ip = ipaddress.ip_address(item["ip"])
    except ValueError:
        raise MalformedMessage(f"body: {item['ip'][:60]!r} is not an IP address") from None
    return Key.from_base64(item["key"]), str(ip)


def ports_from(obj: Any) -> tuple[int, int]:
    ports = obj.get("ports") if isinstance(obj, dict) else None
    if not (isinstance(ports, list) and len(ports) == 2 and all(_port(p) for p in ports)):
        raise MalformedMessage('relay control: expected {"ports": [port, port]}')
    return ports[0], ports[1]


def slots_from(obj: Any) -> tuple[dict[tuple[Key, Key], tuple[int, int]], int]:
    """The pairs a relay holds slots for (each pair in the order the relay lists it, its
    ports in that order), and how many ports it has free."""
    slots, free = (obj.get("slots"), obj.get("free_ports")) if isinstance(obj, dict) else (
        None, None)
    if not isinstance(slots, list) or not isinstance(free, int) or not _count(free):
        raise MalformedMessage('relay control: expected {"slots": [...], "free_ports": N}')
    found = {}
    for slot in slots:
        nodes = slot.get("nodes") if isinstance(slot, dict) else None
        if not (isinstance(nodes, list) and len(nodes) == 2
                and all(isinstance(n, str) for n in nodes)):
            raise MalformedMessage("relay control: a slot without its two nodes")
        found[Key.from_base64(nodes[0]), Key.from_base64(nodes[1])] = ports_from(slot)
    return found, free


def _port(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# -- the server ---------------------------------------------------------------------------------


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=dumps)


@web.middleware
async def _signed(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Only signed requests reach a handler; every answer to one is signed."""
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            body = await request.read()
    except (TimeoutError, web.HTTPException, ConnectionError):
        return _json({"error": "relay control: body not read"}, 400)
    try:
        nonce = request.app[VERIFIER].verify(request.headers.get(HEADER), request.method,
                                             request.path_qs, body, time.time())
    except RequestRefused as error:
        held = request.app[REFUSALS].allow(request.remote, time.monotonic())
        if held is not None:
            log.warning("%s (from %s%s)", error, request.remote,
                        f"; {held} more held back" if held else "",
                        extra={"event": "relay_control_refused"})
        return _json({"error": str(error)}, error.status)
    request[BODY], request[NONCE] = body, nonce
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = _json({"error": exc.reason.lower()}, exc.status)
    except MalformedMessage as exc:
        response = _json({"error": str(exc)}, 400)
    except RequestRefused as exc:
        response = _json({"error": str(exc)}, exc.status)
    assert isinstance(response, web.Response) and isinstance(response.body, bytes)
    response.headers[HEADER] = sign_answer(request.app[VERIFIER].secret, nonce,
                                           response.status, response.body)
    return response


async def post_slots(request: web.Request) -> web.Response:
    (node, node_ip), (peer, peer_ip) = slot_request_from(decode_object(request[BODY]))
    ips, relay = request.app[IPS], request.app[RELAY]
    ips[node], ips[peer] = node_ip, peer_ip
    mine, theirs = relay.allocate(node, peer)
    held = {n for slot in relay.table for n in slot.pair}
    for gone in [n for n in ips if n not in held]:  # the IPs of nodes without a slot
        del ips[gone]
    return _json({"ports": [mine.port, theirs.port]}, 201 if mine.created else 200)


async def post_pause(request: web.Request) -> web.Response:
    node, peer = pause_request_from(decode_object(request[BODY]))
    return _json({"paused": request.app[RELAY].pause(node, peer)})


async def get_slots(request: web.Request) -> web.Response:
    """The slots in use: a paused one (its pair went direct) is not listed, so that a pair
    that asks again may be placed anew, and no stream replays it (relayroute.py)."""
    relay = request.app[RELAY]
    return _json({
        "slots": [{"nodes": [slot.a.node.base64(), slot.b.node.base64()],
                   "ports": [slot.a.port, slot.b.port]} for slot in relay.table
                  if slot.paused_at is None],
        "free_ports": relay.table.free_ports,
    })


def create_app(relay: Relay, secret: bytes, ips: dict[Key, str]) -> web.Application:
    """The control API over `relay`, whose `observed` reads `ips` (filled from requests)."""
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_signed])
    app[RELAY], app[VERIFIER], app[IPS] = relay, Verifier(secret), ips
    app[REFUSALS] = Throttle(60.0, max_lines=10)
    app.router.add_post("/v1/slots", post_slots)
    app.router.add_post("/v1/slots/pause", post_pause)
    app.router.add_get("/v1/slots", get_slots, allow_head=False)
    return app


@contextlib.asynccontextmanager
async def serving(relay: Relay, secret: bytes, ips: dict[Key, str], listen: Endpoint
                  ) -> AsyncIterator[None]:
    """The control API on `listen` while the block runs."""
    runner = web.AppRunner(create_app(relay, secret, ips), access_log=None,
                           handle_signals=False, keepalive_timeout=30.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, str(listen.ip), listen.port).start()
    except OSError as error:
        await runner.cleanup()
        raise ConfigError(f"relay: cannot listen on {listen}: {error.strerror}") from None
    log.info("relay control API on %s", listen, extra={"event": "relay_control_serving"})
    try:
        yield
    finally:
        await runner.cleanup()
