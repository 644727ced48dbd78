"""No private or preshared key crosses the registry's API (DESIGN §8, §10), proven against a
real wireguard-go device whose peers all have preshared keys: the registry's observer reads
it as `wgpunch registry` does, and every answer of every endpoint (bodies, headers, stream
lines: snapshot, peer change, punch; and the metrics page) is scanned for each secret in
every spelling.

The device lives in a throwaway namespace (tests/wgpair.py); the API is served on loopback
in this process, its callers' identities the peers' allowed IPs 127.0.0.1/32 and 127.0.0.2/32.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import generate_latest

from polling import poll
from test_registry_api import READ_S, start
from wgpair import unique_prefix, wg_pair
from wgpunch.keys import Key, generate_keypair
from wgpunch.registry.exporter import RegistryExporter
from wgpunch.registry.observer import Observer
from wgpunch.registry.state import RegistryState
from wgpunch.registry.timings import Timings
from wgpunch.wg.uapi import UapiDevice

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="wireguard-go not installed"),
]


def spellings(key: Key) -> list[bytes]:
    b32 = base64.b32encode(key.raw)
    return [key.raw, key.base64().encode(), key.base64().rstrip("=").encode(),
            base64.urlsafe_b64encode(key.raw), key.hex().encode(), key.hex().upper().encode(),
            b32, b32.lower(), json.dumps(list(key.raw)).encode()]


async def answer(response: aiohttp.ClientResponse) -> bytes:
    headers = "".join(f"{k}: {v}\n" for k, v in response.headers.items()).encode()
    return headers + await response.read()


async def test_no_private_or_preshared_key_crosses_the_api(tmp_path: Path):
    with wg_pair(tmp_path, unique_prefix("sk")) as (reg, other):
        secrets = [reg.private]
        callers = [generate_keypair()[1] for _ in range(2)]
        for n, key in enumerate([other.public, *callers]):
            psk = generate_keypair()[0]
            secrets.append(psk)
            (tmp_path / "psk").write_text(psk.base64())
            args = ["preshared-key", str(tmp_path / "psk")]
            if n:  # the callers: loopback identities, and endpoints so that a punch works
                args += ["allowed-ips", f"127.0.0.{n}/32", "endpoint", f"192.0.2.{9 + n}:51820"]
            reg.wg_set("peer", key.base64(), *args)
        assert all(row[1] != "(none)" for row in reg.wg_show_dump()[1:])  # every peer has one

        state = RegistryState(epoch="e1")
        timings = Timings(heartbeat_s=0.2, poll_interval_s=0.05)
        exporter = RegistryExporter(state)  # its /metrics (--metrics-listen) is scanned too
        observer = Observer(lambda: UapiDevice(reg.ifname), state, timings)
        registry = await start(state, timings, observer=observer, metrics=exporter)
        try:
            seen: list[bytes] = []
            one, two = await registry.client("127.0.0.1"), await registry.client("127.0.0.2")
            async def all_peers() -> bool:
                return len((await (await one.get("/v1/peers")).json())["peers"]) == 3

            await poll(all_peers, what="the observer's first read")
            watch = await one.get("/v1/watch")
            lines = [await watch.content.readline()]  # the snapshot
            for response in [
                await one.get("/v1/peers"), await two.get("/v1/peers"),
                await one.put("/v1/self", json={"listen_port": 51820, "version": "t",
                                                "local_addresses": ["192.168.1.2"]}),
                await one.post(f"/v1/punch/{callers[1].hex()}"),
                await one.post(f"/v1/punch/{other.public.hex()}"),  # 409: no endpoint
                await one.get("/healthz"), await one.get("/metrics"),
                await one.get("/v1/watch?since=zz"),
                await (await registry.client("127.0.0.3")).get("/v1/peers"),  # a stranger
            ]:
                seen.append(await answer(response))
            async with asyncio.timeout(READ_S):
                while not any(b'"punch"' in line for line in lines):  # then peer + punch
                    lines.append(await watch.content.readline())
            seen += [*lines, generate_latest(exporter.registry)]
            assert any(json.loads(line)["type"] == "peer" for line in lines)
        finally:
            await registry.close()
        everything = b"\n".join(seen)
        assert other.public.base64().encode() in everything  # the scan sees the keys it may
        for secret in secrets:
            for spelling in spellings(secret):
                assert spelling not in everything
