"""WireGuard device control: one interface over the UAPI and netlink backends.

`open_device` and `list_devices` are the only places that know the backends; everything else
speaks `Device`. A userspace implementation is recognised by its UAPI socket (for an interface
that exists in this namespace); anything else is asked of the kernel over netlink.
"""

from __future__ import annotations

import asyncio

from .device import Device, DeviceState, Endpoint, PeerConfig, PeerState
from .uapi import UapiDevice, socket_path
from .uapi import list_devices as list_uapi_devices

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
    from .netlink import list_kernel_devices

    # pyroute2's synchronous sockets run an event loop of their own: keep them off ours.
    kernel = await asyncio.to_thread(list_kernel_devices)
    return sorted(set(list_uapi_devices()) | set(kernel))


def open_device(name: str) -> Device:
    """The device called `name`, with the backend that serves it.

    No I/O happens until the first operation; a missing device shows up there as
    `DeviceNotFound`.
    """
    if socket_path(name).exists():
        return UapiDevice(name)
    from .netlink import NetlinkDevice

    return NetlinkDevice(name)
