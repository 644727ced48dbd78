"""WireGuard device control: one interface over the UAPI and netlink backends.

`open_device` and `list_devices` are the only places that know the backends; everything else
speaks `Device`. A userspace implementation is recognised by its UAPI socket (for an interface
that exists in this namespace); anything else is asked of the kernel over netlink.

The backends (and asyncio with them) are imported when a device is opened or listed, so that
the types in model.py and device.py cost a command that only parses options nothing more.
"""

from __future__ import annotations

from ..errors import DeviceNotFound
from .device import Device
from .model import DeviceState, Endpoint, PeerConfig, PeerState

__all__ = [
    "Device",
    "DeviceState",
    "Endpoint",
    "PeerConfig",
    "PeerState",
    "list_devices",
    "open_device",
]


async def list_devices() -> list[str]:
    """Every WireGuard interface in this network namespace, sorted by name."""
    import asyncio

    from .netlink import list_kernel_devices
    from .uapi import list_devices as list_uapi_devices

    # pyroute2's synchronous sockets run an event loop of their own: keep them off ours.
    kernel = await asyncio.to_thread(list_kernel_devices)
    return sorted(set(list_uapi_devices()) | set(kernel))


def open_device(name: str) -> Device:
    """The device called `name`, with the backend that serves it.

    A name no interface in this network namespace has is `DeviceNotFound` at once, naming
    the WireGuard interfaces that are here: asking the kernel about it would only say that
    it has no WireGuard module, which on a wireguard-go host is true and beside the point.
    Otherwise no I/O happens until the first operation.
    """
    from .uapi import UapiDevice, interface_here, socket_path
    from .uapi import list_devices as list_uapi_devices

    if socket_path(name).exists():
        return UapiDevice(name)
    if not interface_here(name):
        present = list_uapi_devices()
        raise DeviceNotFound(
            f"no interface {name!r} in this network namespace (no wireguard-go socket "
            f"{socket_path(name)}, no kernel device); "
            + (f"WireGuard interfaces here: {', '.join(present)}" if present
               else "`ip link` lists the interfaces here")
        )
    from .netlink import NetlinkDevice

    return NetlinkDevice(name)
