"""What `status` says a peer's path is and why: the agent's word when one runs, the device's
otherwise. Pure: no device, no agent process."""

import json
from dataclasses import replace

import pytest

from wgpunch.keys import Key
from wgpunch.node import pathfile
from wgpunch.node.pathfile import PeerPath, RegistryHealth
from wgpunch.status import peer_json, registries_json, registries_line, registry_line
from wgpunch.wg.model import DeviceState, Endpoint, PeerState

NOW = 1_800_000_000.0


def peer(age: float | None, endpoint: str | None = "198.51.100.2:51820") -> PeerState:
    return PeerState(
        public_key=Key(bytes(32)), endpoint=None if endpoint is None else Endpoint.parse(endpoint),
        allowed_ips=(), latest_handshake=None if age is None else NOW - age, rx_bytes=0,
        tx_bytes=0, persistent_keepalive=25, has_preshared_key=False)


@pytest.mark.parametrize(("intent", "state", "path", "reason"), [
    ("a live session", peer(10), "direct", "live session (no wgpunch node agent on this "
     "interface)"),
    ("a session past Reject-After-Time says how long ago", peer(600), "none",
     "no handshake for 10m00s (no wgpunch node agent on this interface)"),
    ("never, without an endpoint: nothing could have been sent", peer(None, None), "none",
     "never a handshake, and no endpoint (no wgpunch node agent on this interface)"),
])
def test_without_an_agent_the_device_says_why(intent, state, path, reason):
    shown = peer_json(state, NOW)
    assert (shown["path"], shown["path_since"], shown["reason"]) == (path, None, reason), intent


def test_with_an_agent_its_path_since_and_reason_are_shown():
    agent = PeerPath(path="relay", since=NOW - 5, reason="waiting before the next attempt",
                     endpoint="198.51.100.2:51820")
    shown = peer_json(peer(10), NOW, agent)
    assert (shown["path"], shown["path_since"], shown["reason"]) == (
        "relay", NOW - 5, "waiting before the next attempt")


@pytest.mark.parametrize(("intent", "registry", "line"), [
    ("following, since when",
     {"following": "registry http://10.99.0.254:51821: following its watch stream",
      "state": "following", "since": NOW - 300, "error": None},
     "registry http://10.99.0.254:51821: following its watch stream for 5m00s"),
    ("lost: for how long, why, and what that means for the tunnels",
     {"following": "x", "state": "unreachable", "since": NOW - 40,
      "error": "registry: watch stream ended"},
     "unreachable for 40s: registry: watch stream ended; live sessions do not need it, new "
     "paths and changed endpoints wait for it"),
    ("never reached since the agent started",
     {"following": "x", "state": "connecting", "since": NOW - 5, "error": "connection refused"},
     "not reached yet for 5s: connection refused; live sessions do not need it, new paths and "
     "changed endpoints wait for it"),
])
def test_the_registry_link_in_words(intent, registry, line):
    assert registry_line(registry, NOW) == line, intent


def test_several_registries_each_in_words_and_through_the_agents_file(tmp_path):
    """node/registries.py: each registry's stream, last event and session, as the agent
    published them (pathfile) and status shows them; an older file without them reads."""
    key = Key(bytes([7]) * 32)
    health = RegistryHealth("registry http://10.99.0.253:51821: following its watch stream",
                            "unreachable", NOW - 40, "registry: watch stream ended",
                            public_key=key.base64(), last_event=NOW - 41)
    pathfile.write("wg0", {}, tmp_path, registries=(health,))
    assert pathfile.read_published("wg0", tmp_path).registries == (health,)
    device = DeviceState("wg0", None, 0, 0, (replace(peer(20), public_key=key),))
    shown = registries_json(health, device, NOW)
    assert shown == {"public_key": key.base64(), "following": health.following,
                     "state": "unreachable", "since": NOW - 40,
                     "error": "registry: watch stream ended", "last_event": NOW - 41,
                     "handshake_age_s": 20.0}
    assert registries_line(shown, NOW) == (
        f"{key.base64()}: unreachable for 40s (registry: watch stream ended), last event 41s "
        "ago, handshake 20s ago")
    never = registries_json(replace(health, state="connecting", last_event=None, error=None),
                            replace(device, peers=()), NOW)
    assert registries_line(never, NOW).endswith(
        ": not reached yet for 40s, last event never, handshake never")
    body = json.loads(pathfile.path_file("wg0", tmp_path).read_text())
    del body["registries"]  # as an agent before several registries wrote it
    pathfile.path_file("wg0", tmp_path).write_text(json.dumps(body))
    assert pathfile.read_published("wg0", tmp_path).registries == ()
