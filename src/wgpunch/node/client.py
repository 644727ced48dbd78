"""The node's side of the registry API (docs/api.md): requests, and the watch stream parsed
into typed events. Everything the registry sends is validated here, at the edge; a reply
that does not fit is a `RegistryError`, like a refused or lost connection."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp

from ..errors import WgpunchError
from ..keys import Key
from ..wg.device import Endpoint, IPAddress, IPNetwork

API_PORT = 51821
MAX_LINE_BYTES = 4 * 1024 * 1024  # one snapshot line of a large registry


class RegistryError(WgpunchError):
    """The registry could not be reached, refused a request or answered nonsense."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Reported:
    listen_port: int
    local_addresses: tuple[IPAddress, ...]
    version: str


@dataclass(frozen=True, slots=True)
class RegistryPeer:
    public_key: Key
    allowed_ips: tuple[IPNetwork, ...]
    endpoint: Endpoint | None
    latest_handshake: float | None
    reported: Reported | None
    revision: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    epoch: str
    revision: int
    peers: tuple[RegistryPeer, ...]


@dataclass(frozen=True, slots=True)
class PeerChanged:
    revision: int
    peer: RegistryPeer


@dataclass(frozen=True, slots=True)
class PeerRemoved:
    revision: int
    public_key: Key


@dataclass(frozen=True, slots=True)
class Punch:
    revision: int
    peer: Key
    endpoint: Endpoint | None
    initiator: bool


@dataclass(frozen=True, slots=True)
class Heartbeat:
    revision: int


Event = Snapshot | PeerChanged | PeerRemoved | Punch | Heartbeat


def _peer(obj: Any) -> RegistryPeer:
    reported = obj["reported"]
    return RegistryPeer(
        public_key=Key.from_base64(obj["public_key"]),
        allowed_ips=tuple(ipaddress.ip_network(n) for n in obj["allowed_ips"]),
        endpoint=None if obj["endpoint"] is None else Endpoint.parse(obj["endpoint"]),
        latest_handshake=obj["latest_handshake"],
        reported=None
        if reported is None
        else Reported(
            int(reported["listen_port"]),
            tuple(ipaddress.ip_address(a) for a in reported["local_addresses"]),
            str(reported["version"]),
        ),
        revision=int(obj["revision"]),
    )


def parse_event(line: bytes) -> Event:
    try:
        obj = json.loads(line)
        kind = obj["type"]
        revision = int(obj["revision"])
        if kind == "snapshot":
            return Snapshot(str(obj["epoch"]), revision, tuple(_peer(p) for p in obj["peers"]))
        if kind == "peer":
            return PeerChanged(revision, _peer(obj["peer"]))
        if kind == "removed":
            return PeerRemoved(revision, Key.from_base64(obj["public_key"]))
        if kind == "punch":
            endpoint = obj.get("endpoint")
            return Punch(
                revision,
                Key.from_base64(obj["peer"]),
                None if endpoint is None else Endpoint.parse(endpoint),
                bool(obj["initiator"]),
            )
        if kind == "heartbeat":
            return Heartbeat(revision)
    except (ValueError, KeyError, TypeError, WgpunchError) as error:
        raise RegistryError(f"registry: malformed watch event {line[:120]!r}: {error}") from None
    raise RegistryError(f"registry: unknown watch event type {kind!r}")


class RegistryClient:
    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout_s: float = 5.0,
        heartbeat_timeout_s: float = 7.0,  # the registry's 5 s heartbeat plus a margin
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session = aiohttp.ClientSession(headers=headers)

    async def close(self) -> None:
        await self._session.close()

    async def _request(self, method: str, path: str, body: Any = None) -> Any:
        url = self.base_url + path
        try:
            async with self._session.request(
                method, url, json=body, timeout=aiohttp.ClientTimeout(total=self.timeout_s)
            ) as response:
                text = await response.text()
                if response.status >= 400:
                    raise RegistryError(
                        f"registry: {method} {path}: {response.status} {_error_text(text)}",
                        response.status,
                    )
                return json.loads(text) if text else None
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            raise RegistryError(f"registry: {method} {url}: {_describe(error)}") from None

    async def peers(self) -> Snapshot:
        obj = await self._request("GET", "/v1/peers")
        try:
            peers = tuple(_peer(p) for p in obj["peers"])
            return Snapshot(str(obj["epoch"]), int(obj["revision"]), peers)
        except (ValueError, KeyError, TypeError, WgpunchError) as error:
            raise RegistryError(f"registry: malformed /v1/peers reply: {error}") from None

    async def report_self(
        self, listen_port: int, local_addresses: list[IPAddress], version: str
    ) -> None:
        body = {
            "listen_port": listen_port,
            "local_addresses": [str(a) for a in local_addresses],
            "version": version,
        }
        await self._request("PUT", "/v1/self", body)

    async def punch(self, peer: Key) -> None:
        await self._request("POST", f"/v1/punch/{peer.hex()}")

    async def watch(self, since: int | None, epoch: str | None) -> AsyncIterator[Event]:
        """Events until the stream ends; a silent stream counts as dead after the timeout."""
        query = {} if since is None or epoch is None else {"since": since, "epoch": epoch}
        url = f"{self.base_url}/v1/watch"
        if query:
            url += "?" + urlencode(query)
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self.timeout_s, sock_read=self.heartbeat_timeout_s
        )
        try:
            async with self._session.get(url, timeout=timeout) as response:
                if response.status >= 400:
                    text = await response.text()
                    raise RegistryError(
                        f"registry: watch: {response.status} {_error_text(text)}", response.status
                    )
                # Lines are split here rather than with readline(), whose 64 KiB cap a
                # large registry's snapshot line exceeds.
                buffer = bytearray()
                async for chunk in response.content.iter_any():
                    buffer += chunk
                    while (end := buffer.find(b"\n")) >= 0:
                        line = bytes(buffer[:end])
                        del buffer[: end + 1]
                        if line.strip():
                            yield parse_event(line)
                    if len(buffer) > MAX_LINE_BYTES:
                        raise RegistryError("registry: watch event too large")
                raise RegistryError("registry: watch stream ended")
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            raise RegistryError(f"registry: watch {url}: {_describe(error)}") from None


def _describe(error: Exception) -> str:
    return str(error) or type(error).__name__


def _error_text(text: str) -> str:
    try:
        return str(json.loads(text)["error"])
    except (ValueError, KeyError, TypeError):
        return text[:200]
