"""An impaired cable: `python3 -m wgpunch.lab.wire UP DOWN --delay-ms D --jitter-ms J --loss-pct L`.

This kernel has no `sch_netem` (nor fq, nor act_gact), so `tc netem` cannot delay or drop.
Instead an impaired link runs through a namespace of its own with two veth ends, and this
process moves every Ethernet frame from one end to the other through AF_PACKET sockets: it
drops a frame with probability L %, and otherwise sends it on after D ± J ms (uniform, per
frame and direction, like netem's default; jitter larger than the gap between frames
reorders them, as netem does). Frames are moved as they are: ARP, IP, anything.

It prints `ready` once both sockets are bound, then runs until killed (the lab's teardown
kills every process in its namespaces).
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import os
import random
import select
import socket
import sys
import time

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15  # linux/if_packet.h
FRAME_MAX = 65535 + 10  # a GSO frame plus its virtio_net_hdr


def open_end(ifname: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    # With a virtio_net_hdr in front of every frame, a frame whose checksum the sender left
    # to offload (CHECKSUM_PARTIAL, usual on veth) or that still holds several UDP/TCP
    # segments (GSO; wireguard-go sends UDP GSO batches) is carried on with that state
    # intact instead of arriving with a bad checksum or as one oversized packet.
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    sock.bind((ifname, 0))
    sock.setblocking(False)
    return sock


def run(up: str, down: str, delay_ms: float, jitter_ms: float, loss_pct: float,
        rng: random.Random) -> None:
    ends = [open_end(up), open_end(down)]
    other = {ends[0]: ends[1], ends[1]: ends[0]}
    print("ready", flush=True)
    # Nothing reads our stdout after `ready`: never write to it again.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    queue: list[tuple[float, int, socket.socket, bytes]] = []
    seq = 0
    while True:
        timeout = max(0.0, queue[0][0] - time.monotonic()) if queue else None
        readable, _, _ = select.select(ends, [], [], timeout)
        now = time.monotonic()
        for sock in readable:
            while True:
                try:
                    frame, address = sock.recvfrom(FRAME_MAX)
                except BlockingIOError:
                    break
                if address[2] == socket.PACKET_OUTGOING:  # our own sends, seen again
                    continue
                if rng.random() * 100 < loss_pct:
                    continue
                delay = max(0.0, delay_ms + rng.uniform(-jitter_ms, jitter_ms)) / 1000
                seq += 1  # keeps frames with equal due times in arrival order
                heapq.heappush(queue, (now + delay, seq, other[sock], frame))
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, out, frame = heapq.heappop(queue)
            # A full queue or an oversized frame: lost, like on a cable.
            with contextlib.suppress(OSError):
                out.send(frame)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m wgpunch.lab.wire", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("up", help="interface toward the parent (core or NAT)")
    parser.add_argument("down", help="interface toward the child")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="uniform +- jitter")
    parser.add_argument("--loss-pct", type=float, default=0.0, help="loss per direction")
    parser.add_argument("--seed", type=int, default=None, help="seed for loss and jitter")
    args = parser.parse_args(argv)
    try:
        run(args.up, args.down, args.delay_ms, args.jitter_ms, args.loss_pct,
            random.Random(args.seed))
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
