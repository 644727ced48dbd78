"""The node's side of the registry API (docs/api.md): requests, and the watch stream parsed
into the protocol's event types (protocol/codec.py decodes what the registry
encodes), over the node's own HTTP client (http.py). Everything the registry sends is
validated here, at the edge; a reply that does not fit is an `ApiError`, like a refused or
lost connection."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

from ..errors import ApiError, MalformedMessage
from ..keys import Key
from ..protocol import (
    Event,
    RelayEvent,
    Reported,
    Snapshot,
    item_from_json,
    relay_from_json,
    snapshot_from_json,
)
from ..wg.model import Endpoint
from .http import HttpClient

MAX_LINE_BYTES = 4 * 1024 * 1024  # one snapshot line of a large registry
CONNECTIONS_MAX = 32


def parse_event(line: bytes) -> Event:
    try:
        return item_from_json(json.loads(line))
    except (ValueError, RecursionError) as error:  # MalformedMessage is a ValueError
        raise ApiError(f"registry: bad watch event: {error}") from None


class RegistryClient:
    coordinates_punches = True

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout_s: float = 5.0,
        # The registry's 2 s heartbeat, one lost, plus TCP's retransmission of the next.
        heartbeat_timeout_s: float = 4.5,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # Below the registry's 64 connections per caller (registry/limits.py): a node asking
        # for many peers' punches at once waits for a connection instead of being reset.
        self._http = HttpClient(self.base_url, headers=headers, limit=CONNECTIONS_MAX)

    @property
    def following(self) -> str:
        return f"registry {self.base_url}: following its watch stream"

    async def close(self) -> None:
        await self._http.close()

    async def _request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        response = await self._http.request(method, path, data, timeout_s=self.timeout_s)
        text = response.body.decode("utf-8", errors="replace")
        if response.status >= 400:
            raise ApiError(f"registry: {method} {path}: {response.status} {_error_text(text)}",
                           response.status)
        try:
            return json.loads(text) if text else None
        except (ValueError, RecursionError) as error:
            raise ApiError(f"registry: {method} {self.base_url + path}: {error}") from None

    async def peers(self) -> Snapshot:
        obj = await self._request("GET", "/v1/peers")
        try:
            return snapshot_from_json(obj)
        except MalformedMessage as error:
            raise ApiError(f"registry: /v1/peers reply: {error}") from None

    async def report_self(self, report: Reported) -> None:
        await self._request("PUT", "/v1/self", report.to_json())

    async def snapshot(self) -> Snapshot:
        return await self.peers()

    def lookup_failed(self, peer: Key) -> bool:
        return False  # a failed request raises; there are no per-peer lookups

    async def punch(self, peer: Key) -> None:
        await self._request("POST", f"/v1/punch/{peer.hex()}")

    async def opened(self, peer: Key) -> None:
        await self._request("POST", f"/v1/punch/{peer.hex()}/opened")

    async def relay(self, peer: Key) -> RelayEvent:
        obj = await self._request("POST", f"/v1/relay/{peer.hex()}")
        try:
            return relay_from_json(obj)
        except MalformedMessage as error:
            raise ApiError(f"registry: /v1/relay reply: {error}") from None

    async def direct(self, peer: Key, endpoint: Endpoint, peer_endpoint: Endpoint) -> None:
        await self._request("POST", f"/v1/relay/{peer.hex()}/direct",
                            {"endpoint": str(endpoint), "peer_endpoint": str(peer_endpoint)})

    async def watch(self, since: int | None, epoch: str | None) -> AsyncIterator[Event]:
        """Events until the stream ends; a silent stream counts as dead after the timeout."""
        query = {} if since is None or epoch is None else {"since": since, "epoch": epoch}
        path = "/v1/watch" + ("?" + urlencode(query) if query else "")
        buffer = bytearray()
        async for status, chunk in self._http.stream(
                path, connect_timeout_s=self.timeout_s, read_timeout_s=self.heartbeat_timeout_s):
            if status >= 400:
                raise ApiError(f"registry: watch: {status} "
                               f"{_error_text(chunk.decode('utf-8', errors='replace'))}", status)
            buffer += chunk
            while (end := buffer.find(b"\n")) >= 0:
                line = bytes(buffer[:end])
                del buffer[: end + 1]
                if line.strip():
                    yield parse_event(line)
            if len(buffer) > MAX_LINE_BYTES:
                raise ApiError("registry: watch event too large")
        raise ApiError("registry: watch stream ended")


def _error_text(text: str) -> str:
    try:
        return str(json.loads(text)["error"])
    except (ValueError, KeyError, TypeError):
        return text[:200]
