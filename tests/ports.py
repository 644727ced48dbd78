"""Loopback ports for servers under test, each free for UDP and TCP at once (the DNS server
takes both kinds: a port free for one kind only can be held in the other, by an outgoing
connection say)."""

from __future__ import annotations

import socket
from contextlib import ExitStack


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports, each free for UDP and TCP on `host` when returned."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    ports: list[int] = []
    with ExitStack() as held:  # held until all are chosen, so no port comes back twice
        for _ in range(50 * count):
            if len(ports) == count:
                return ports
            udp = held.enter_context(socket.socket(family, socket.SOCK_DGRAM))
            udp.bind((host, 0))
            port = udp.getsockname()[1]
            tcp = held.enter_context(socket.socket(family, socket.SOCK_STREAM))
            try:
                tcp.bind((host, port))
            except OSError:
                continue
            ports.append(port)
        if len(ports) == count:
            return ports
    raise OSError(f"no {count} ports free for both UDP and TCP on {host}")


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]
