"""A tiny UDP tool run inside lab namespaces: reflector, prober and poker in one.

    python3 -m wgpunch.lab.probe --port 3478 --echo --lifetime 60     # a reflector
    python3 -m wgpunch.lab.probe --port 40000 --send 198.51.100.1:3478 --send ...
    python3 -m wgpunch.lab.probe --port 5000 --send 198.51.100.6:40000=poke --lifetime 0

It binds one UDP port, sends one datagram to each `--send IP:PORT[=TEXT]` (TEXT defaults to
`probe`), again every `--every` seconds if given (a steady flow; only the first round is
reported), then reports every datagram it receives, until `--lifetime` seconds have passed
or `--expect` datagrams arrived. With `--echo` it answers each datagram with the sender's
address as it observed it (`IP:PORT`): the mapping a NAT gave the sender, as a STUN server
would report it. Output is one JSON object per line on stdout:

    {"event": "bound", "port": 40000}
    {"event": "sent", "to": "198.51.100.1:3478", "text": "probe"}
    {"event": "recv", "from": "198.51.100.6:40000", "text": "198.51.100.6:40000"}
    {"event": "done", "received": 2}

Standard library only, and every socket operation has a timeout: it never lingers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sys
import time

DATAGRAM_MAX = 2048


def emit(**event: object) -> None:
    print(json.dumps(event), flush=True)


def parse_target(text: str) -> tuple[tuple[str, int], str]:
    address, _, payload = text.partition("=")
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected IP:PORT[=TEXT], got {text!r}")
    return (host, int(port)), payload or "probe"


def serve(port: int, targets: list[tuple[tuple[str, int], str]], *, echo: bool,
          lifetime: float, expect: int | None, every: float | None = None) -> int:
    received = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("0.0.0.0", port))
        emit(event="bound", port=sock.getsockname()[1])
        for address, text in targets:
            sock.settimeout(1.0)
            sock.sendto(text.encode(), address)
            emit(event="sent", to=f"{address[0]}:{address[1]}", text=text)
        deadline = time.monotonic() + lifetime
        period = every if targets else None
        again = None if period is None else time.monotonic() + period
        while expect is None or received < expect:
            now = time.monotonic()
            if period is not None and again is not None and now >= again:
                for address, text in targets:
                    with contextlib.suppress(BlockingIOError):  # a full buffer: a lost one
                        sock.sendto(text.encode(), address)
                again = max(again + period, now)
            left = deadline - now
            if left <= 0:
                break
            sock.settimeout(left if again is None else max(0.0, min(left, again - now)))
            try:
                data, (ip, sport) = sock.recvfrom(DATAGRAM_MAX)
            except TimeoutError:
                if again is not None:
                    continue
                break
            except BlockingIOError:  # a zero timeout: nothing waiting, time to send again
                continue
            except ConnectionRefusedError:  # an ICMP error for something we sent: not data
                continue
            received += 1
            emit(event="recv", **{"from": f"{ip}:{sport}"}, text=data.decode(errors="replace"))
            if echo:
                sock.sendto(f"{ip}:{sport}".encode(), (ip, sport))
    emit(event="done", received=received)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m wgpunch.lab.probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True, help="local UDP port to bind")
    parser.add_argument("--send", type=parse_target, action="append", default=[],
                        metavar="IP:PORT[=TEXT]", help="send one datagram there (repeatable)")
    parser.add_argument("--echo", action="store_true",
                        help="answer each datagram with its observed source IP:PORT")
    parser.add_argument("--lifetime", type=float, default=5.0,
                        help="stop receiving after this many seconds (default 5)")
    parser.add_argument("--expect", type=int, default=None,
                        help="stop after this many datagrams arrived")
    parser.add_argument("--every", type=float, default=None, metavar="SECONDS",
                        help="send to every --send target again this often")
    args = parser.parse_args(argv)
    if args.every is not None and args.every <= 0:
        parser.error(f"--every must be above 0, got {args.every}")
    try:
        return serve(args.port, args.send, echo=args.echo, lifetime=args.lifetime,
                     expect=args.expect, every=args.every)
    except (KeyboardInterrupt, BrokenPipeError):
        return 0


if __name__ == "__main__":
    sys.exit(main())
