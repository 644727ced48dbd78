"""Telling systemd how a daemon is doing: the sd_notify(3) protocol, without libsystemd.

A unit with `Type=notify` gets `$NOTIFY_SOCKET`, the address of a unix datagram socket. The
service sends it one datagram of newline-separated `KEY=VALUE` fields: `READY=1` once it
serves (systemd then counts the start as done and starts what is ordered after it),
`STOPPING=1` when it begins to shut down, `STATUS=...` for `systemctl status`. An address
that starts with '@' is in the abstract namespace ('@' stands for the leading NUL byte).
Without the variable (not under systemd) nothing is sent. A failure to send is logged, never
raised: the daemon serves all the same, and systemd times the start out on its own.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

# A datagram to a local socket leaves at once unless the receiver's queue is full; PID 1
# reads its queue continuously, so waiting longer than this means it is stuck. Our choice.
SEND_TIMEOUT_S = 1.0


def address(value: str) -> str | None:
    """The socket address `$NOTIFY_SOCKET` names; None for a kind we do not speak (systemd
    255 added `vsock:CID:PORT`, for virtual machines)."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def notify(*fields: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send `fields` (`"READY=1"`, `"STATUS=serving on ..."`) as one datagram to
    `$NOTIFY_SOCKET`. True when it was sent; False without the variable or on failure."""
    value = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not value:
        return False
    target = address(value)
    if target is None:
        log.warning("sd_notify: NOTIFY_SOCKET %r is no unix socket; not telling systemd %s",
                    value, ", ".join(fields))
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT_S)
            sock.sendto("\n".join(fields).encode(), target)
    except OSError as error:
        log.warning("sd_notify: cannot tell systemd %s at %s: %s", ", ".join(fields), value,
                    error.strerror or error)
        return False
    return True
