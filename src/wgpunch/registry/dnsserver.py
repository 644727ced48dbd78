"""The DNS-SD server: `dnssd.answer` on UDP and TCP sockets, plus the registry's own record.

Answers come from the registry's peer table as the observer keeps it (no device read per
query). Only peers, through the tunnel, are answered, and networks allowed explicitly
(dnsaccess.py); anything else is dropped before it is parsed, counted (`refused`) and logged
throttled. Both transports run on the API's event loop, and neither can hold it up:
- UDP: asyncio reads one datagram per socket per loop iteration, so a flood costs the API one
  answer's time (about 0.3 ms) per turn; the kernel drops what does not keep up.
  Replies are dropped, not queued, while the socket's send buffer is backed up.
- TCP (RFC 7766, 2-byte length prefix): at most `DnsLimits.tcp_clients_max` connections, and
  `tcp_per_client_max` of one client (a peer, or an address of an allowed network), so one
  client cannot hold every slot; each is closed after `dns_tcp_idle_s` without a complete
  query, on the first malformed one, and when its source is no longer allowed.
A packet that does not parse is dropped and counted, and logged at most once per source per
`dns_malformed_log_s`; an unexpected error answering one is a SERVFAIL, never a crash.

The `self` record (wgsd's `self [ENDPOINT] [CIDR...]`, shared/reference/wgsd.md §1.8) has the
device's key, the configured allowed IPs and, as endpoint, the configured IP:PORT. Without
one, the registry cannot see the public address nodes reach it at (wgsd serves the DNS
socket's local address, `::` or the tunnel address, issue #31). It serves instead the source
address of its route toward the querying node's observed endpoint, with the device's listen
port: on a host with a public address (DESIGN.md §1) that is the address nodes send to. Behind
a NAT or port forward it is not, so an explicit endpoint is the reliable way.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import time
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from ..errors import ConfigError, MalformedPacket
from ..keys import Key
from ..throttle import Throttle
from ..wg.model import Endpoint, IPAddress, IPNetwork
from .auth import source_ip
from .dnsaccess import Access, RefusalLog
from .dnssd import InstanceCache, Record, Zone, answer, parse_query, servfail
from .dnswire import size_limit, to_wire
from .state import RegistryState
from .timings import Timings

log = logging.getLogger(__name__)

# Our choice: replies waiting in a UDP socket's user-space buffer; beyond this the client is
# not reading (or is spoofed) and the reply is dropped, as the kernel would.
UDP_BACKLOG_MAX = 256 * 1024
# Our choice: derived self endpoints remembered per table revision (one per querying node).
SELF_CACHE_MAX = 4096


@dataclass(frozen=True, slots=True)
class DnsLimits:
    """What clients may hold of the server; our choices. (Its timers are the registry's
    `Timings`: `dns_tcp_idle_s`, `forbidden_log_s`, `dns_malformed_log_s`.)"""

    # DNS-over-TCP connections open at once: far more than the nodes of a mesh querying at
    # once over TCP (wgsd-client uses UDP only). One over the limit is closed at once.
    tcp_clients_max: int = 128
    # ... of one client. RFC 7766 §6.2.2: a client SHOULD use one connection for its queries;
    # 8 leaves room for a few programs on one node, and it takes 16 clients to fill the server.
    tcp_per_client_max: int = 8
    # Refusals of sources outside the tunnel, all sources together: at most one line per this
    # period (each source at most once per `forbidden_log_s`). Spoofed sources are free.
    refused_log_interval_s: float = 1.0
    # Refused sources remembered for the per-source period; the memory such a flood can take.
    refused_sources_max: int = 4096

    def __post_init__(self) -> None:
        if not (self.tcp_clients_max >= 1 and self.tcp_per_client_max >= 1
                and self.refused_log_interval_s > 0 and self.refused_sources_max >= 1):
            raise ConfigError(f"registry: DNS limits must be positive: {self}")


@dataclass(frozen=True, slots=True)
class Instance:
    """The registry's own record, in the shape `dnssd.Record` asks for."""

    public_key: Key
    endpoint: Endpoint | None
    allowed_ips: tuple[IPNetwork, ...]


@dataclass(frozen=True, slots=True)
class SelfConfig:
    """wgsd's `self` options: an explicit endpoint (None: derived), and allowed IPs."""

    endpoint: Endpoint | None
    allowed_ips: tuple[IPNetwork, ...]

    @classmethod
    def parse(cls, args: Sequence[str]) -> SelfConfig:
        """wgsd setup.go: the first argument is the endpoint if it is IP:PORT ([IPv6]:PORT);
        every other one is a CIDR, host bits cleared (Go's net.ParseCIDR)."""
        endpoint = None
        rest = list(args)
        if rest and not _looks_like_cidr(rest[0]):
            try:
                endpoint = Endpoint.parse(rest[0])
            except ValueError as exc:
                raise ConfigError(f"registry: DNS self endpoint {rest[0]!r}: expected IP:PORT "
                                  f"or [IPv6]:PORT, or a CIDR ({exc})") from None
            rest = rest[1:]
        nets = []
        for text in rest:
            try:
                if "/" not in text:
                    raise ValueError("no /PREFIX")
                nets.append(ipaddress.ip_network(text, strict=False))
            except ValueError as exc:
                raise ConfigError(f"registry: DNS self allowed IP {text!r}: {exc}") from None
        return cls(endpoint, tuple(nets))


def _looks_like_cidr(text: str) -> bool:
    return "/" in text and not text.startswith("[")


def route_source(ip: IPAddress) -> IPAddress | None:
    """The local address the kernel would send from toward `ip` (None: no route)."""
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((str(ip), 9))  # UDP connect only picks a route: nothing is sent
            return ipaddress.ip_address(sock.getsockname()[0].partition("%")[0])
    except (OSError, ValueError):
        return None


class DnsServer:
    """`allow`: networks answered besides the peers' tunnel addresses (by default none:
    tunnel only)."""

    def __init__(self, zone: Zone, state: RegistryState, *, self_config: SelfConfig | None,
                 tunnel_ips: Iterable[IPAddress] = (), allow: Iterable[IPNetwork] = (),
                 timings: Timings | None = None, limits: DnsLimits | None = None) -> None:
        self.zone = zone
        self._state = state
        self._self = self_config
        self._tunnel_ips = frozenset(tunnel_ips)
        self._timings = timings or Timings()
        self._limits = limits or DnsLimits()
        self._access = Access(state, allow)
        self._throttle = Throttle(self._timings.dns_malformed_log_s)
        self._refusals = RefusalLog(self._timings.forbidden_log_s,
                                    self._limits.refused_log_interval_s,
                                    self._limits.refused_sources_max)
        self._derived: dict[IPAddress | None, Endpoint | None] = {}
        self._derived_revision = -1
        self._instances = InstanceCache()
        self._udp: list[asyncio.DatagramTransport] = []
        self._tcp: list[asyncio.Server] = []
        self._clients: dict[asyncio.Task, asyncio.StreamWriter] = {}
        self._per_client: Counter[Hashable] = Counter()
        self.addresses: list[tuple[str, int]] = []
        self.counts = {"queries": 0, "answered": 0, "malformed": 0, "ignored": 0,
                       "errors": 0, "dropped": 0, "refused": 0, "tcp_refused": 0,
                       "tcp_client_full": 0}
        self.rcodes: Counter[str] = Counter()  # answers sent, by rcode name

    @property
    def connections(self) -> int:
        """DNS-over-TCP connections open now."""
        return len(self._clients)

    # -- answering (plain def: the table cannot change underneath) ----------------------------

    def handle(self, wire: bytes, source: str | None, *, tcp: bool) -> bytes | None:
        """The reply to one message, or None when nothing is to be sent."""
        self.counts["queries"] += 1
        if self._access.client(source) is None:
            self._refused(source, "a query")
            return None
        try:
            query = parse_query(wire)
        except MalformedPacket as exc:
            self._malformed(source, wire, exc)
            return None
        except Exception:  # a bug in the parser: this packet is lost, not the server
            self._error(source)
            return None
        limit = size_limit(query, tcp=tcp)
        try:
            response = answer(query, self.zone, self._state, lambda: self._me(source),
                              limit=limit, cache=self._instances)
            if response is None:
                self.counts["ignored"] += 1
                return None
            reply = to_wire(response, limit)
        except Exception:
            self._error(source)
            self.rcodes["SERVFAIL"] += 1
            return to_wire(servfail(query), limit)
        self.counts["answered"] += 1
        self.rcodes[response.rcode().name] += 1
        return reply

    def _refused(self, source: str | None, what: str) -> None:
        """A query or connection from outside the tunnel (dnsaccess.py): dropped."""
        self.counts["refused"] += 1
        if self._refusals.allow(source, time.monotonic()):
            log.warning("DNS: refused %s from %s: not the tunnel address of exactly one peer, "
                        "nor in an allowed network (%d refused in all)", what, source,
                        self.counts["refused"],
                        extra={"event": "dns_refused", "source": source})

    def _error(self, source: str | None) -> None:
        self.counts["errors"] += 1
        if self._throttle.allow(("error", source), time.monotonic()) is not None:
            log.exception("DNS: internal error answering %s", source,
                          extra={"event": "dns_error", "source": source})

    def _malformed(self, source: str | None, wire: bytes, exc: Exception) -> None:
        self.counts["malformed"] += 1
        held = self._throttle.allow(source, time.monotonic())
        if held is not None:
            reason = (str(exc) or type(exc).__name__).splitlines()[0][:120]
            log.warning("DNS: dropped a malformed packet from %s (%d bytes): %s%s", source,
                        len(wire), reason, f" ({held} more since)" if held else "",
                        extra={"event": "dns_malformed", "source": source})

    def _me(self, source: str | None) -> Record | None:
        key = self._state.device_key
        if self._self is None or key is None:
            return None
        endpoint = self._self.endpoint
        if endpoint is None:
            endpoint = self._derive(source_ip(source))
        return Instance(key, endpoint, self._self.allowed_ips)

    def _derive(self, source: IPAddress | None) -> Endpoint | None:
        """The route's source address toward the querying node (module docstring)."""
        if self._derived_revision != self._state.revision or (
                len(self._derived) >= SELF_CACHE_MAX):
            self._derived.clear()
            self._derived_revision = self._state.revision
        if source in self._derived:
            return self._derived[source]
        peers = self._state.peers
        caller = None if source is None else self._access.identify(source)
        record = None if caller is None else peers.get(caller)
        toward = record.endpoint if record is not None else None
        if toward is None:  # not a node (a local test, a monitor): any node's view will do
            toward = next((r.endpoint for r in peers.values() if r.endpoint is not None), None)
        local = None if toward is None else route_source(toward.ip)
        port = self._state.listen_port
        endpoint = None
        if (local is not None and port and not local.is_unspecified
                and local not in self._tunnel_ips):
            endpoint = Endpoint(local, port)
        self._derived[source] = endpoint
        return endpoint

    # -- sockets ----------------------------------------------------------------------------

    async def start(self, addresses: Sequence[tuple[str, int]]) -> None:
        """Serve UDP and TCP on each (ip, port); port 0 picks a free UDP port and uses the
        same for TCP (tests). A failure closes whatever was opened."""
        try:
            for host, port in addresses:
                where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                # A free UDP port may be taken for TCP (any connection's local port): with
                # port 0, another is picked.
                for tries_left in reversed(range(8 if port == 0 else 1)):
                    try:
                        self.addresses.append((host, await self._serve_on(host, port)))
                        break
                    except OSError as exc:
                        if not tries_left or exc.errno != errno.EADDRINUSE:
                            raise ConfigError(f"registry: cannot serve DNS on {where}: "
                                              f"{exc.strerror or exc}") from None
        except BaseException:
            await self.close()
            raise

    async def _serve_on(self, host: str, port: int) -> int:
        """UDP and TCP on (host, port); the port they got."""
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: _Udp(self), local_addr=(host, port))
        try:
            port = transport.get_extra_info("sockname")[1]
            self._tcp.append(await asyncio.start_server(
                self._tcp_client, host, port, reuse_address=True))
        except BaseException:
            transport.close()
            raise
        self._udp.append(transport)
        return port

    async def close(self) -> None:
        for server in self._tcp:
            server.close()
        # Connections are cut, not their tasks cancelled: each then ends as when its client
        # hangs up (asyncio logs an error for a cancelled client_connected_cb task).
        for writer in list(self._clients.values()):
            writer.transport.abort()
        for task in list(self._clients):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for server in self._tcp:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        for transport in self._udp:
            transport.close()
        self._tcp, self._udp = [], []

    async def _tcp_client(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        source = peer[0] if peer else None
        client = self._access.client(source)
        if client is None:
            self._refused(source, "a TCP connection")
            writer.close()
            return
        if self._per_client[client] >= self._limits.tcp_per_client_max:
            self.counts["tcp_client_full"] += 1
            if self._throttle.allow(("tcp_client_full", client), time.monotonic()) is not None:
                log.warning("DNS: closed a TCP connection from %s: its client already has %d "
                            "open", source, self._limits.tcp_per_client_max,
                            extra={"event": "dns_tcp_full", "source": source})
            writer.close()
            return
        if len(self._clients) >= self._limits.tcp_clients_max:
            self.counts["tcp_refused"] += 1
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._clients[task] = writer
        self._per_client[client] += 1
        idle = self._timings.dns_tcp_idle_s
        try:
            while True:
                async with asyncio.timeout(idle):
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    wire = await reader.readexactly(size)
                reply = self.handle(wire, source, tcp=True)
                if reply is None:
                    break
                writer.write(len(reply).to_bytes(2, "big") + reply)
                async with asyncio.timeout(idle):
                    await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass  # idle, gone, or cut off: the connection simply ends
        finally:
            self._clients.pop(task, None)
            self._per_client[client] -= 1
            if not self._per_client[client]:
                del self._per_client[client]
            writer.close()


class _UdpTransport(Protocol):
    """What _Udp uses of its transport. asyncio's datagram transport is a WriteTransport too
    (it has a write buffer), which typeshed's DatagramTransport does not say."""

    def sendto(self, data: bytes, addr: tuple[Any, ...]) -> None: ...
    def get_write_buffer_size(self) -> int: ...


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self._server = server
        self._transport: _UdpTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(_UdpTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        reply = self._server.handle(data, addr[0], tcp=False)
        if reply is None or self._transport is None:
            return
        if self._transport.get_write_buffer_size() > UDP_BACKLOG_MAX:
            self._server.counts["dropped"] += 1
            return
        self._transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        # An ICMP error for an earlier reply (the client went away): nothing to do.
        log.debug("DNS: UDP error: %s", exc)
