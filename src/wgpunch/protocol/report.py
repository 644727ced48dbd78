"""What a node reports about itself (`PUT /v1/self`): its listen port, LAN addresses, version,
and (optional: older nodes send none of them) the endpoint it mapped on its NAT (UPnP-IGD,
NAT-PMP or PCP), its NAT's behaviour (natinfo.py) and its IPv6 endpoints: its listen port on
each of its global IPv6 addresses, where no NAT stands between it and a peer with IPv6
(at most a stateful firewall, which an opener from the peer's side gets through).

`Reported` checks every field on construction, so an invalid report cannot exist; the JSON
decoder in front of it is strict too (UTF-8 only, one object, no duplicate or unknown keys, no
NaN), and every failure is one `MalformedMessage` naming the field.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any

from ..errors import ChangeRefused, MalformedMessage
from ..wg.model import Endpoint, IPAddress
from .natinfo import NatBehaviour, nat_from_json

MAX_BODY_BYTES = 4096  # docs/api.md
MAX_LOCAL_ADDRESSES = 32  # docs/api.md; more LAN addresses than candidates worth trying
MAX_VERSION_CHARS = 64  # docs/api.md
_MAX_ADDRESS_CHARS = 45  # the longest IPv6 text form (IPv4-mapped, fully written out)
_PRINTABLE = frozenset(chr(c) for c in range(0x20, 0x7F))
FIELDS = ("listen_port", "local_addresses", "version")  # required
OPTIONAL_FIELDS = ("mapped_endpoint", "nat", "ipv6_endpoints")
_MAX_ENDPOINT_CHARS = _MAX_ADDRESS_CHARS + 8  # brackets, colon, port
MAX_IPV6_ENDPOINTS = 8  # docs/api.md; a host has one or two stable global addresses
GLOBAL_UNICAST6 = ipaddress.IPv6Network("2000::/3")  # RFC 4291 §2.4, the routed space
# Inside it, but tunnels to IPv4 rather than addresses of the host's own network: 6to4
# (RFC 3056) and Teredo (RFC 4380).
TUNNELED6 = (ipaddress.IPv6Network("2002::/16"), ipaddress.IPv6Network("2001::/32"))


def globally_routed6(address: ipaddress.IPv6Address) -> bool:
    """Whether a peer on another site can reach `address` over IPv6: global unicast, not a
    6to4 or Teredo address. Not `is_global`: that counts the documentation prefix
    2001:db8::/32, which the lab numbers its IPv6 internet from, as private."""
    return address in GLOBAL_UNICAST6 and not any(address in net for net in TUNNELED6)


@dataclass(frozen=True, slots=True)
class Reported:
    listen_port: int
    local_addresses: tuple[IPAddress, ...]
    version: str
    # A port the node mapped on its NAT for its listen port: a peer sending there reaches it
    # whatever its NAT's kind (DESIGN.md §3, candidate "mapped"). None: no mapping.
    mapped: Endpoint | None = None
    nat: NatBehaviour | None = None  # None: not reported (an older node, or not measured yet)
    ipv6: tuple[Endpoint, ...] = ()  # our listen port on our global IPv6 addresses


    def __post_init__(self) -> None:
        port = self.listen_port
        if not isinstance(port, int) or isinstance(port, bool):
            raise MalformedMessage(f"listen_port: expected an integer, got {_kind(port)}")
        if not 1 <= port <= 65535:
            raise MalformedMessage(f"listen_port: {port} is not in 1-65535")
        if not isinstance(self.local_addresses, tuple):
            raise MalformedMessage("local_addresses: expected a list")
        if len(self.local_addresses) > MAX_LOCAL_ADDRESSES:
            raise MalformedMessage(
                f"local_addresses: {len(self.local_addresses)} addresses, "
                f"at most {MAX_LOCAL_ADDRESSES}"
            )
        for address in self.local_addresses:
            if not isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
                raise MalformedMessage(f"local_addresses: {address!r} is not an IP address")
            judged = _as_ipv4(address)
            if judged.is_unspecified or judged.is_loopback or judged.is_multicast:
                raise MalformedMessage(
                    f"local_addresses: {address} cannot be reached from another host")
        if len({_as_ipv4(a) for a in self.local_addresses}) != len(self.local_addresses):
            raise MalformedMessage("local_addresses: an address is listed twice")
        if not isinstance(self.version, str):
            raise MalformedMessage(f"version: expected text, got {_kind(self.version)}")
        if len(self.version) > MAX_VERSION_CHARS:
            raise MalformedMessage(
                f"version: {len(self.version)} characters, at most {MAX_VERSION_CHARS}"
            )
        if not set(self.version) <= _PRINTABLE:
            raise MalformedMessage("version: only printable ASCII characters are allowed")
        if self.mapped is not None:
            if not isinstance(self.mapped, Endpoint):
                raise MalformedMessage(f"mapped_endpoint: {self.mapped!r} is not an endpoint")
            judged = _as_ipv4(self.mapped.ip)
            if judged.is_unspecified or judged.is_loopback or judged.is_multicast:
                raise MalformedMessage(
                    f"mapped_endpoint: {self.mapped} cannot be reached from another host")

        if self.nat is not None and not isinstance(self.nat, NatBehaviour):
            raise MalformedMessage("nat: expected an object")
        self._check_ipv6()

    def _check_ipv6(self) -> None:
        if not isinstance(self.ipv6, tuple):
            raise MalformedMessage("ipv6_endpoints: expected a list")
        if len(self.ipv6) > MAX_IPV6_ENDPOINTS:
            raise MalformedMessage(f"ipv6_endpoints: {len(self.ipv6)} endpoints, "
                                   f"at most {MAX_IPV6_ENDPOINTS}")
        for endpoint in self.ipv6:
            if not isinstance(endpoint, Endpoint):
                raise MalformedMessage(f"ipv6_endpoints: {endpoint!r} is not an endpoint")
            if (not isinstance(endpoint.ip, ipaddress.IPv6Address)
                    or not globally_routed6(endpoint.ip)):
                raise MalformedMessage(f"ipv6_endpoints: {endpoint.ip} is not a global "
                                       "unicast IPv6 address (2000::/3, not 6to4 or Teredo)")
        if len(set(self.ipv6)) != len(self.ipv6):
            raise MalformedMessage("ipv6_endpoints: an endpoint is listed twice")

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "listen_port": self.listen_port,
            "local_addresses": [str(a) for a in self.local_addresses],
            "version": self.version,
        }
        # Optional fields are absent, not null, when unset: what nodes before them send.
        if self.mapped is not None:
            body["mapped_endpoint"] = str(self.mapped)
        if self.nat is not None:
            body["nat"] = self.nat.to_json()
        if self.ipv6:
            body["ipv6_endpoints"] = [str(e) for e in self.ipv6]
        return body


def _as_ipv4(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (`::ffff:127.0.0.1`) is its IPv4 address, which is what a
    dual-stack socket sending to it reaches; other addresses are themselves."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _kind(value: object) -> str:
    return {
        bool: "a boolean", int: "an integer", float: "a number", str: "text",
        list: "a list", dict: "an object", type(None): "null",
    }.get(type(value), type(value).__name__)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise MalformedMessage(f"body: key {key[:40]!r} appears twice")
        obj[key] = value
    return obj


def _no_constant(name: str) -> Any:
    raise MalformedMessage(f"body: {name} is not valid JSON")


def decode_object(body: bytes) -> dict[str, Any]:
    """A JSON object from a request body, strictly."""
    if not body:
        raise MalformedMessage("body: empty; expected a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedMessage(f"body: not UTF-8 (byte {exc.start + 1})") from None
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise MalformedMessage(f"body: invalid JSON at line {exc.lineno} column {exc.colno}: "
                         f"{exc.msg}") from None
    except RecursionError:
        raise MalformedMessage("body: JSON nested too deeply") from None
    if not isinstance(value, dict):
        raise MalformedMessage(f"body: expected a JSON object, got {_kind(value)}")
    return value


def _address(value: object) -> IPAddress:
    if not isinstance(value, str):
        raise MalformedMessage(f"local_addresses: expected text, got {_kind(value)}")
    if len(value) > _MAX_ADDRESS_CHARS or "%" in value:
        raise MalformedMessage(f"local_addresses: {value[:60]!r} is not an IP address")
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise MalformedMessage(f"local_addresses: {value[:60]!r} is not an IP address") from None


def ipv6_endpoints(value: object) -> tuple[Endpoint, ...]:
    """`ipv6_endpoints` of a report: a list of `[ip]:port` (null or absent: none)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise MalformedMessage(f"ipv6_endpoints: expected a list, got {_kind(value)}")
    if len(value) > MAX_IPV6_ENDPOINTS:
        raise MalformedMessage(f"ipv6_endpoints: {len(value)} endpoints, "
                               f"at most {MAX_IPV6_ENDPOINTS}")
    found = []
    for item in value:
        if not isinstance(item, str):
            raise MalformedMessage(f"ipv6_endpoints: expected text, got {_kind(item)}")
        if len(item) > _MAX_ENDPOINT_CHARS or "%" in item:
            raise MalformedMessage(f"ipv6_endpoints: {item[:60]!r} is not [IPv6]:PORT")
        try:
            found.append(Endpoint.parse(item))
        except (ChangeRefused, ValueError):
            raise MalformedMessage(
                f"ipv6_endpoints: {item[:60]!r} is not [IPv6]:PORT") from None
    return tuple(found)


def mapped_endpoint(value: object) -> Endpoint | None:
    """`mapped_endpoint` of a report: `ip:port` (`[ip]:port` for IPv6) or null."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise MalformedMessage(f"mapped_endpoint: expected text, got {_kind(value)}")
    if len(value) > _MAX_ENDPOINT_CHARS or "%" in value:
        raise MalformedMessage(f"mapped_endpoint: {value[:60]!r} is not IP:PORT")
    try:
        return Endpoint.parse(value)
    except (ChangeRefused, ValueError):
        raise MalformedMessage(f"mapped_endpoint: {value[:60]!r} is not IP:PORT") from None


def reported_from_json(body: bytes) -> Reported:
    """The body of `PUT /v1/self`; every field of FIELDS is required, those of
    OPTIONAL_FIELDS may be left out, no other is allowed."""
    obj = decode_object(body)
    unknown = sorted(set(obj) - set(FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        raise MalformedMessage(
            f"body: unknown field {unknown[0][:40]!r}; allowed: "
            f"{', '.join(FIELDS + OPTIONAL_FIELDS)}")
    missing = [name for name in FIELDS if name not in obj]
    if missing:
        raise MalformedMessage(f"body: missing field {missing[0]!r}")
    addresses = obj["local_addresses"]
    if not isinstance(addresses, list):
        raise MalformedMessage(f"local_addresses: expected a list, got {_kind(addresses)}")
    if len(addresses) > MAX_LOCAL_ADDRESSES:
        raise MalformedMessage(
            f"local_addresses: {len(addresses)} addresses, at most {MAX_LOCAL_ADDRESSES}"
        )
    return Reported(
        listen_port=obj["listen_port"],
        local_addresses=tuple(_address(a) for a in addresses),
        version=obj["version"],
        mapped=mapped_endpoint(obj.get("mapped_endpoint")),
        nat=None if obj.get("nat") is None else nat_from_json(obj["nat"]),
        ipv6=ipv6_endpoints(obj.get("ipv6_endpoints")),
    )
