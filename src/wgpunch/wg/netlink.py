"""Kernel WireGuard through generic netlink (the `wireguard` family), via pyroute2.

A pure codec under a thin I/O class, as in `uapi.py`:

- `device_from_nlmsgs` turns the messages of a WG_CMD_GET_DEVICE dump, as pyroute2 decodes
  them, into a `DeviceState` plus the peers' preshared keys. The kernel splits a big device
  over several messages, and even one peer's allowed IPs over two; both are merged here.
- `set_message_from_changes` turns peer changes into one WG_CMD_SET_DEVICE `wgmsg`. pyroute2's
  own `WireGuard.set()` takes one peer per message (and pyroute2 0.7.x has the peer flag values
  wrong), so the message is built here from pyroute2's nla classes, with the flag values from
  the kernel's include/uapi/linux/wireguard.h.
- `NetlinkDevice` sends them. pyroute2's socket is synchronous, so each operation opens a socket,
  uses it and closes it in one worker thread (`asyncio.to_thread`): pyroute2 binds a socket to
  the thread that made it, and nothing is left open between operations.

Errors are translated here, at the edge: no pyroute2 exception leaves this module.
"""

from __future__ import annotations

import asyncio
import errno as errnos
import ipaddress
import logging
import os
import socket
from base64 import b64decode
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pyroute2 import IPRoute
from pyroute2.netlink import CTRL_CMD_GETFAMILY, GENL_ID_CTRL, NLM_F_ACK, NLM_F_REQUEST, ctrlmsg
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError
from pyroute2.netlink.generic import GenericNetlinkSocket
from pyroute2.netlink.generic.wireguard import WireGuard, wgmsg

from ..errors import ChangeRefused, DeviceError, DeviceNotFound, MalformedReply, WgpunchError
from ..keys import Key
from .device import Device
from .model import DeviceState, Endpoint, IPNetwork, PeerConfig, PeerState, handshake_time

log = logging.getLogger(__name__)

# pyroute2 logs every decoded message at DEBUG, private and preshared keys included. Cap its
# loggers so that running wgpunch with debug logging never writes a secret.
if logging.getLogger("pyroute2").level < logging.INFO:
    logging.getLogger("pyroute2").setLevel(logging.INFO)

# include/uapi/linux/wireguard.h
WG_GENL_NAME = "wireguard"
WG_GENL_VERSION = 1
WG_CMD_SET_DEVICE = 1
WGPEER_F_REMOVE_ME = 0x1
WGPEER_F_REPLACE_ALLOWEDIPS = 0x2
WGPEER_F_UPDATE_ONLY = 0x4

# include/uapi/linux/netlink.h: the kernel sets this on dump messages when the device changed
# while the dump ran (it compares wg->device_update_gen), so the pieces may not fit together.
NLM_F_DUMP_INTR = 0x10
# Our choice: a device rewritten three times during three dumps is being reconfigured by
# someone else at a rate no snapshot can follow; say so instead of looping.
DUMP_ATTEMPTS = 3


class WireGuardSocket(Protocol):
    """The part of pyroute2's `WireGuard` socket this module uses (tests pass a fake)."""

    prid: int

    def info(self, interface: str) -> Iterable[Any]: ...

    def nlm_request(self, msg: Any, msg_type: int, msg_flags: int) -> Iterable[Any]: ...

    def close(self) -> None: ...


# -- reading: dump messages -> DeviceState ---------------------------------------------------


def _key(value: bytes | str, *, secret: bool = False) -> Key:
    # pyroute2 decodes a key attribute to its base64 spelling (`parse_wg_key.decode`).
    return Key(b64decode(value), secret=secret)


def _endpoint(attr: Any) -> Endpoint | None:
    if attr is None or attr.get("family") not in (socket.AF_INET, socket.AF_INET6):
        return None
    if attr["port"] == 0:  # the kernel takes `endpoint IP:0`; `Endpoint` cannot hold it
        return None
    return Endpoint(ipaddress.ip_address(attr["addr"]), attr["port"])


def _handshake(attr: Any) -> float | None:
    return None if attr is None else handshake_time(attr["tv_sec"], attr["tv_nsec"])


def _allowed_ip(attr: Any) -> IPNetwork:
    raw = attr.get_attr("WGALLOWEDIP_A_IPADDR")
    # pyroute2 decodes this 'hex' attribute to text such as "0a:00:00:00".
    packed = raw if isinstance(raw, bytes) else bytes.fromhex(raw.replace(":", ""))
    address = ipaddress.ip_address(packed)
    # strict=False: the kernel already masks host bits; being lax here loses nothing.
    return ipaddress.ip_network((address, attr.get_attr("WGALLOWEDIP_A_CIDR_MASK")), strict=False)


@dataclass
class _PeerParts:
    """One peer as its pieces arrive; the kernel repeats only the key with later allowed IPs."""

    public_key: Key
    first: Any
    allowed_ips: list[IPNetwork] = field(default_factory=list)


def device_from_nlmsgs(msgs: Iterable[Any], ifname: str) -> tuple[DeviceState, dict[Key, Key]]:
    """The snapshot and the non-zero preshared keys from the messages of one GET dump.

    :raises MalformedReply: no message, a peer without a public key, or a value that does not
        decode (a key of the wrong length, an address of neither 4 nor 16 bytes).
    """
    try:
        return _device_from_nlmsgs(list(msgs), ifname)
    except (ValueError, KeyError, TypeError) as error:  # KeyFormatError never shows a secret
        raise MalformedReply(f"netlink: {ifname}: bad device dump: {error}") from None


def _device_from_nlmsgs(msgs: list[Any], ifname: str) -> tuple[DeviceState, dict[Key, Key]]:
    if not msgs:
        raise MalformedReply(f"netlink: {ifname}: the device dump is empty")
    device: dict[str, Any] = {}
    peers: dict[Key, _PeerParts] = {}
    for msg in msgs:
        for name in ("WGDEVICE_A_IFNAME", "WGDEVICE_A_PUBLIC_KEY", "WGDEVICE_A_LISTEN_PORT",
                     "WGDEVICE_A_FWMARK"):
            value = msg.get_attr(name)
            if value is not None:  # device attributes come in the first message only
                device.setdefault(name, value)
        for peer in msg.get_attr("WGDEVICE_A_PEERS") or ():
            raw_key = peer.get_attr("WGPEER_A_PUBLIC_KEY")
            if raw_key is None:
                raise MalformedReply(f"netlink: {ifname}: the dump has a peer without a key")
            key = _key(raw_key)
            parts = peers.setdefault(key, _PeerParts(key, peer))
            allowed = peer.get_attr("WGPEER_A_ALLOWEDIPS") or ()
            parts.allowed_ips += [_allowed_ip(attr) for attr in allowed]
    secrets: dict[Key, Key] = {}
    states: list[PeerState] = []
    for parts in peers.values():
        first = parts.first
        raw_psk = first.get_attr("WGPEER_A_PRESHARED_KEY")
        psk = None if raw_psk is None else _key(raw_psk, secret=True)
        if psk is not None and not psk.is_zero():
            secrets[parts.public_key] = psk
        states.append(
            PeerState(
                public_key=parts.public_key,
                endpoint=_endpoint(first.get_attr("WGPEER_A_ENDPOINT")),
                allowed_ips=tuple(parts.allowed_ips),
                latest_handshake=_handshake(first.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")),
                rx_bytes=first.get_attr("WGPEER_A_RX_BYTES") or 0,
                tx_bytes=first.get_attr("WGPEER_A_TX_BYTES") or 0,
                persistent_keepalive=first.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0,
                has_preshared_key=parts.public_key in secrets,
            )
        )
    public = device.get("WGDEVICE_A_PUBLIC_KEY")  # absent while the device has no private key
    state = DeviceState(
        name=device.get("WGDEVICE_A_IFNAME", ifname),
        public_key=None if public is None else _key(public),
        listen_port=device.get("WGDEVICE_A_LISTEN_PORT", 0),
        fwmark=device.get("WGDEVICE_A_FWMARK", 0),
        peers=tuple(states),
    )
    return state, secrets


# -- writing: PeerConfig list -> one SET message ---------------------------------------------


def _allowed_ip_attrs(net: IPNetwork) -> dict[str, Any]:
    family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    return {"attrs": [["WGALLOWEDIP_A_FAMILY", family],
                      ["WGALLOWEDIP_A_IPADDR", net.network_address.packed],
                      ["WGALLOWEDIP_A_CIDR_MASK", net.prefixlen]]}


def _peer_attrs(change: PeerConfig) -> dict[str, Any]:
    attrs: list[list[Any]] = [["WGPEER_A_PUBLIC_KEY", change.public_key.base64()]]
    flags = (
        (WGPEER_F_REMOVE_ME if change.remove else 0)
        | (WGPEER_F_UPDATE_ONLY if change.update_only else 0)
        | (WGPEER_F_REPLACE_ALLOWEDIPS if change.replace_allowed_ips else 0)
    )
    if flags:
        attrs.append(["WGPEER_A_FLAGS", flags])
    if change.preshared_key is not None:  # the kernel copies it as is: all zeros clears it
        attrs.append(["WGPEER_A_PRESHARED_KEY", change.preshared_key.base64()])
    if change.endpoint is not None:
        if getattr(change.endpoint.ip, "scope_id", None):
            # pyroute2 packs sin6_scope_id big-endian where the kernel reads host order, so
            # a zone would land on the wrong interface: refuse it before sending anything.
            raise ChangeRefused(
                f"netlink: peer {change.public_key}: endpoint {change.endpoint} has an IPv6 "
                "zone, which this backend cannot send"
            )
        # pyroute2 picks sockaddr_in or sockaddr_in6 by the ':' in the address text.
        attrs.append(
            ["WGPEER_A_ENDPOINT", {"addr": str(change.endpoint.ip), "port": change.endpoint.port}]
        )
    if change.persistent_keepalive is not None:  # 0 is sent: it turns keepalive off
        attrs.append(["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", change.persistent_keepalive])
    if change.allowed_ips:  # an empty list with REPLACE_ALLOWEDIPS clears; nothing to send
        attrs.append(["WGPEER_A_ALLOWEDIPS", [_allowed_ip_attrs(n) for n in change.allowed_ips]])
    return {"attrs": attrs}


def set_message_from_changes(ifname: str, changes: Sequence[PeerConfig]) -> wgmsg:
    """One WG_CMD_SET_DEVICE message carrying every change, in order.

    :raises ChangeRefused: an endpoint with an IPv6 zone (`fe80::1%eth0`).

    Never split: the kernel applies one message under one lock, which is what makes
    handshake-now's "remove X, add X" a single transaction. Repeating a key is allowed here
    for that reason; `Device` decides when it is meant.
    """
    msg = wgmsg()
    msg["cmd"] = WG_CMD_SET_DEVICE
    msg["version"] = WG_GENL_VERSION
    msg["attrs"].append(["WGDEVICE_A_IFNAME", ifname])
    if changes:
        msg["attrs"].append(["WGDEVICE_A_PEERS", [_peer_attrs(c) for c in changes]])
    return msg


# -- I/O --------------------------------------------------------------------------------------


class _WireGuard(WireGuard):
    """pyroute2's `WireGuard`, closing what it opened when binding to the family fails.

    pyroute2 0.9 makes an event loop and a netlink socket before it looks the family up, and
    leaves both open when that fails (no kernel module). A registry polling a missing device
    would pile them up between garbage collections, and a collected loop whose self-pipe was
    finalised first prints a traceback from `BaseEventLoop.__del__`.
    """

    def __init__(self) -> None:
        try:
            super().__init__()
        except BaseException:
            if hasattr(self, "asyncore"):
                self.close()
            raise


def _open_wireguard() -> WireGuardSocket:
    return _WireGuard()


def _translate(error: NetlinkError | OSError, ifname: str, operation: str) -> WgpunchError:
    code = error.code if isinstance(error, NetlinkError) else (error.errno or 0)
    if code in (errnos.ENODEV, errnos.ENOENT):
        return DeviceNotFound(f"netlink: no WireGuard device {ifname!r}")
    if code == errnos.EOPNOTSUPP:
        # The kernel's answer for an interface that exists but is not kernel WireGuard (a
        # wireguard-go tun device, say): not ours, so the factory may try the next backend.
        return DeviceNotFound(f"netlink: {ifname!r} is not a kernel WireGuard device")
    reason = os.strerror(code) if code > 0 else str(error)  # OSError from pyroute2 may lack one
    return DeviceError(f"netlink: {ifname}: {operation}: {reason}", max(code, 0))


class NetlinkDevice(Device):
    """A kernel WireGuard interface in this network namespace."""

    backend = "netlink"

    def __init__(
        self, name: str, *, open_socket: Callable[[], WireGuardSocket] = _open_wireguard
    ) -> None:
        super().__init__(name)
        self._open_socket = open_socket

    async def _read(self) -> tuple[DeviceState, dict[Key, Key]]:
        msgs = await asyncio.to_thread(self._run, "get", self._dump)
        return device_from_nlmsgs(msgs, self.name)

    async def private_key(self) -> Key | None:
        msgs = await asyncio.to_thread(self._run, "get", self._dump)
        value = msgs[0].get_attr("WGDEVICE_A_PRIVATE_KEY") if msgs else None
        try:
            key = None if value is None else _key(value, secret=True)
        except ValueError:  # KeyFormatError and binascii.Error; neither shows the value
            raise MalformedReply(f"netlink: {self.name}: the private key does not decode") from None
        return None if key is None or key.is_zero() else key

    async def _write(self, changes: Sequence[PeerConfig]) -> None:
        msg = set_message_from_changes(self.name, changes)  # built fully before any I/O
        await asyncio.to_thread(self._run, "set", lambda sock: self._send(sock, msg))

    def _run(self, operation: str, body: Callable[[WireGuardSocket], list[Any]]) -> list[Any]:
        """Open a socket, run `body` with it, close it; all in the calling (worker) thread."""
        try:
            sock = self._open_socket()
        except NetlinkError as error:
            # The socket resolves the family when it opens: ENOENT here means no module.
            if error.code == errnos.ENOENT:
                raise DeviceNotFound(
                    f"netlink: no WireGuard device {self.name!r}: the kernel has no WireGuard "
                    f"module (no {WG_GENL_NAME!r} generic netlink family)"
                ) from None
            raise _translate(error, self.name, "open") from None
        except OSError as error:
            raise _translate(error, self.name, "open") from None
        try:
            return body(sock)
        except (NetlinkError, OSError) as error:
            raise _translate(error, self.name, operation) from None
        finally:
            sock.close()

    def _dump(self, sock: WireGuardSocket) -> list[Any]:
        for _attempt in range(DUMP_ATTEMPTS):
            try:
                msgs = list(sock.info(self.name))
            except NetlinkDumpInterrupted:  # pyroute2 0.7 raises this; 0.9 passes the flag on
                continue
            if not any(m["header"]["flags"] & NLM_F_DUMP_INTR for m in msgs):
                return msgs
            log.debug("%s: device changed during the dump; reading it again", self.name)
        raise DeviceError(
            f"netlink: {self.name}: get: the device changed during {DUMP_ATTEMPTS} dumps in a row",
            errnos.EINTR,
        )

    def _send(self, sock: WireGuardSocket, msg: wgmsg) -> list[Any]:
        # pyroute2 raises NetlinkError for a negative ACK while the replies are iterated.
        return list(sock.nlm_request(msg, msg_type=sock.prid, msg_flags=NLM_F_REQUEST | NLM_F_ACK))


# -- for the backend factory -----------------------------------------------------------------


def genl_family_exists(name: str) -> bool:
    """Whether the kernel knows generic netlink family `name` (asking may load its module).

    Asked with a bare CTRL_CMD_GETFAMILY rather than by opening pyroute2's `WireGuard`, which
    logs two lines at ERROR level when the family is missing: an expected answer on any
    machine that runs wireguard-go.
    """
    msg = ctrlmsg()
    msg["cmd"] = CTRL_CMD_GETFAMILY
    msg["version"] = 1
    msg["attrs"].append(["CTRL_ATTR_FAMILY_NAME", name])
    try:
        with GenericNetlinkSocket() as sock:
            sock.marshal.msg_map[GENL_ID_CTRL] = ctrlmsg
            list(sock.nlm_request(msg, msg_type=GENL_ID_CTRL, msg_flags=NLM_F_REQUEST))
    except NetlinkError as error:
        if error.code != errnos.ENOENT:
            log.debug("netlink: asking for family %r: %s", name, os.strerror(error.code))
        return False
    except OSError as error:  # no netlink at all (a sandbox): certainly no kernel WireGuard
        log.debug("netlink: asking for family %r: %s", name, error.strerror)
        return False
    return True


def kernel_wireguard_available() -> bool:
    return genl_family_exists(WG_GENL_NAME)


def list_kernel_devices() -> list[str]:
    """Names of the kernel WireGuard interfaces in this network namespace, sorted."""
    try:
        with IPRoute() as ipr:
            links = list(ipr.get_links())
    except (NetlinkError, OSError) as error:
        code = error.code if isinstance(error, NetlinkError) else (error.errno or 0)
        raise DeviceError(f"netlink: list links: {os.strerror(code)}", code) from None
    names = []
    for link in links:
        info = link.get_attr("IFLA_LINKINFO")
        if info is not None and info.get_attr("IFLA_INFO_KIND") == WG_GENL_NAME:
            names.append(link.get_attr("IFLA_IFNAME"))
    return sorted(names)
