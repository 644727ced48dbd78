"""The UAPI codec (pure: uapi.py's `set`, uapiget.py's `get` reply) and the socket client
against throwaway servers that misbehave on purpose: things the real wireguard-go will not do
on demand (an errno, a cut-off reply, a server that hangs or hangs up, a reply that changes
just so between two reads)."""

import asyncio
import contextlib
import ipaddress
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wgpunch.errors import ChangeRefused, DeviceError, DeviceNotFound, MalformedReply
from wgpunch.keys import Key, public_key
from wgpunch.wg.model import Endpoint, PeerConfig, parse_allowed_ip
from wgpunch.wg.uapi import PIECE_BYTES, UapiDevice, encode_set, parse_set_reply
from wgpunch.wg.uapiget import GetCutter, parse_get, parse_peer, update_counters

# The example dialogue from wireguard.com/xplatform (the UAPI specification).
XPLATFORM_GET = """\
private_key=e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a
listen_port=12912
public_key=b85996fecc9c7f1fc6d2572a76eda11d59bcd20be8e543b15ce4bd85a8e75a33
preshared_key=188515093e952f5f22e865cef3012e72f8b5f0b598ac0309d5dacce3b70fcf52
allowed_ip=192.168.4.4/32
endpoint=[abcd:23::33%2]:51820
public_key=58402e695ba1772b1cc9309755f043251ea77fdcf10fbe63989ceb7e19321376
tx_bytes=38333
rx_bytes=2224
allowed_ip=192.168.4.6/32
persistent_keepalive_interval=111
endpoint=182.122.22.19:3233
public_key=662e14fd594556f522604703340351258903b64f35553763f19426ab2a515c58
endpoint=5.152.198.39:51820
allowed_ip=192.168.4.10/32
allowed_ip=192.168.4.11/32
tx_bytes=1212111
rx_bytes=1929999999
protocol_version=1
errno=0

"""
PRIVATE_HEX = "e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a"
PSK_HEX = "188515093e952f5f22e865cef3012e72f8b5f0b598ac0309d5dacce3b70fcf52"
PEER1 = Key.from_hex("b85996fecc9c7f1fc6d2572a76eda11d59bcd20be8e543b15ce4bd85a8e75a33")
PEER2 = Key.from_hex("58402e695ba1772b1cc9309755f043251ea77fdcf10fbe63989ceb7e19321376")


def test_parse_xplatform_example():
    state, secrets = parse_get(XPLATFORM_GET, "wg0")
    assert state.public_key == public_key(Key.from_hex(PRIVATE_HEX, secret=True))
    assert state.listen_port == 12912 and state.fwmark == 0
    assert [p.public_key for p in state.peers][:2] == [PEER1, PEER2]
    first, second, third = state.peers
    assert str(first.endpoint) == "[abcd:23::33%2]:51820"
    assert first.has_preshared_key and secrets == {PEER1: Key.from_hex(PSK_HEX)}
    assert first.latest_handshake is None
    assert (second.tx_bytes, second.rx_bytes, second.persistent_keepalive) == (38333, 2224, 111)
    assert second.endpoint == Endpoint(ipaddress.ip_address("182.122.22.19"), 3233)
    assert [str(n) for n in third.allowed_ips] == ["192.168.4.10/32", "192.168.4.11/32"]
    assert not third.has_preshared_key


def test_secrets_stay_out_of_the_snapshot():
    state, _ = parse_get(XPLATFORM_GET, "wg0")
    text = repr(state)
    assert PRIVATE_HEX not in text and PSK_HEX not in text
    assert Key.from_hex(PSK_HEX).base64() not in text


@pytest.mark.parametrize(
    ("sec", "nsec", "expected"),
    [
        (0, 0, None),  # never
        (1700000000, 0, 1700000000.0),  # exactly on a second is a real handshake
        (1700000000, 500000000, 1700000000.5),
    ],
)
def test_handshake_time(sec, nsec, expected):
    reply = (f"public_key={PEER1.hex()}\nlast_handshake_time_sec={sec}\n"
             f"last_handshake_time_nsec={nsec}\nerrno=0\n\n")
    state, _ = parse_get(reply, "wg0")
    assert state.peers[0].latest_handshake == expected


def test_unknown_keys_are_skipped():
    state, _ = parse_get(f"new_device_thing=1\npublic_key={PEER1.hex()}\nfoo=bar=baz\nerrno=0\n\n",
                         "wg0")
    assert state.peers[0].public_key == PEER1


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        ("listen_port=1\nerrno=0\n", "truncated"),
        ("listen_port=1\n", "truncated"),
        ("", "truncated"),
        ("listen_port=1\n\n", "no errno line"),
        ("listen_port\nerrno=0\n\n", "line 1: 'listen_port' is not key=value"),
        ("=1\nerrno=0\n\n", "is not key=value"),
        ("listen_port=70000\nerrno=0\n\n", "unsigned 16-bit"),
        ("listen_port=-1\nerrno=0\n\n", "unsigned 16-bit"),
        (f"public_key={PEER1.hex()[:-2]}\nerrno=0\n\n", "line 1 public_key"),
        (f"public_key={PEER1.hex()}\nendpoint=nonsense\nerrno=0\n\n", "endpoint"),
        (f"public_key={PEER1.hex()}\nallowed_ip=10.0.0.1/33\nerrno=0\n\n", "allowed IP"),
        (f"public_key={PEER1.hex()}\nrx_bytes=1e3\nerrno=0\n\n", "rx_bytes"),
        (f"public_key={PEER1.hex()}\nlast_handshake_time_nsec=1000000000\nerrno=0\n\n",
         "nanoseconds"),
        ("errno=zero\n\n", "is not a number"),
        ("errno=\u00b2\n\n", "is not a number"),  # a digit to str.isdigit, not to int()
        ("listen_port=\u00b2\nerrno=0\n\n", "line 1: listen_port='\u00b2' is not an unsigned"),
        ("errno=0\nlisten_port=1\n\n", "'listen_port' after the errno line"),
        ("errno=0\nerrno=0\n\n", "line 1: errno before the last line"),
        (f"public_key={PEER1.hex()}\nerrno=0\npublic_key={PEER2.hex()}\n\n", "no errno line"),
        (f"listen_port=1\npublic_key={PEER1.hex()}\nrx_bytes=1\npublic_key={PEER2.hex()}\n"
         "tx_bytes=x\nerrno=0\n\n", "line 5: tx_bytes='x'"),
    ],
)
def test_malformed_get_replies(reply, message):
    with pytest.raises(MalformedReply, match=message):
        parse_get(reply, "wg0")


def test_errno_in_get_reply_is_a_device_error():
    with pytest.raises(DeviceError, match=r"wg0: get failed: errno 22 \(EINVAL") as caught:
        parse_get("errno=-22\n\n", "wg0")
    assert caught.value.errno == 22


def test_set_reply():
    parse_set_reply("errno=0\n\n", "wg0")
    with pytest.raises(DeviceError, match=r"errno 98 \(EADDRINUSE") as caught:
        parse_set_reply("errno=-98\n\n", "wg0")
    assert caught.value.errno == 98
    for bad in ("", "errno=0\n", "listen_port=1\nerrno=0\n\n", "\n\n"):
        with pytest.raises(MalformedReply):
            parse_set_reply(bad, "wg0")


def test_encode_set_golden():
    psk = Key.from_hex(PSK_HEX, secret=True)
    changes = [
        PeerConfig(PEER1, remove=True),
        PeerConfig(
            PEER1,
            endpoint=Endpoint.parse("[2001:db8::1]:51820"),
            persistent_keepalive=25,
            preshared_key=psk,
            replace_allowed_ips=True,
            allowed_ips=(parse_allowed_ip("10.0.0.2/32"), parse_allowed_ip("fd00::/64")),
        ),
        PeerConfig(PEER2, update_only=True, endpoint=Endpoint.parse("192.0.2.1:1")),
    ]
    assert encode_set(changes) == (
        "set=1\n"
        f"public_key={PEER1.hex()}\nremove=true\n"
        f"public_key={PEER1.hex()}\npreshared_key={PSK_HEX}\n"
        "endpoint=[2001:db8::1]:51820\npersistent_keepalive_interval=25\n"
        "replace_allowed_ips=true\nallowed_ip=10.0.0.2/32\nallowed_ip=fd00::/64\n"
        f"public_key={PEER2.hex()}\nupdate_only=true\nendpoint=192.0.2.1:1\n"
        "\n"
    )


def test_peer_config_is_validated_before_anything_is_sent():
    with pytest.raises(ChangeRefused, match="keepalive 70000"):
        PeerConfig(PEER1, persistent_keepalive=70000)
    with pytest.raises(ChangeRefused, match="remove takes no other field"):
        PeerConfig(PEER1, remove=True, endpoint=Endpoint.parse("192.0.2.1:1"))
    with pytest.raises(ChangeRefused, match="not a secret key"):
        PeerConfig(Key(bytes(32), secret=True))
    with pytest.raises(ChangeRefused, match="replace_allowed_ips needs"):
        PeerConfig(PEER1, replace_allowed_ips=True)
    for bad in ("192.0.2.1", "192.0.2.1:0", "2001:db8::1:5", "host.example:1", "[::1]:x"):
        with pytest.raises(ChangeRefused):
            Endpoint.parse(bad)


ips = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6))
peers = st.builds(
    lambda raw, ip, port, ka, nets: PeerConfig(
        Key(raw), endpoint=Endpoint(ip, port), persistent_keepalive=ka,
        replace_allowed_ips=True, allowed_ips=tuple(nets)),
    st.binary(min_size=32, max_size=32), ips, st.integers(1, 65535), st.integers(0, 65535),
    st.lists(st.builds(lambda ip: ipaddress.ip_network(ip), ips), max_size=4),
)


@given(st.lists(peers, max_size=5, unique_by=lambda p: p.public_key))
def test_what_we_set_is_what_a_get_reads(changes):
    """Turn a set request into the get reply a server would give, and parse it back."""
    body = encode_set(changes).removeprefix("set=1\n").removesuffix("\n")
    reply = body.replace("replace_allowed_ips=true\n", "") + "errno=0\n\n"
    state, _ = parse_get(reply, "wg0")
    assert [p.public_key for p in state.peers] == [c.public_key for c in changes]
    for peer, change in zip(state.peers, changes, strict=True):
        assert peer.endpoint == change.endpoint
        assert peer.allowed_ips == change.allowed_ips
        assert peer.persistent_keepalive == change.persistent_keepalive


@given(st.text(max_size=300))
def test_any_text_parses_or_fails_cleanly(reply):
    with contextlib.suppress(DeviceError):
        parse_get(reply, "wg0")


def cut(reply: str, pieces: list[str]) -> tuple[str, list[str]] | str:
    """The device lines and blocks of `reply` fed as `pieces`, or the error it raised."""
    cutter = GetCutter("wg0")
    try:
        blocks = [block for piece in pieces for block in cutter.feed(piece)] + cutter.finish()
    except DeviceError as error:
        return str(error)
    return cutter.head, blocks


replies = st.one_of(
    st.just(XPLATFORM_GET),
    st.just("public_key=" + XPLATFORM_GET.split("public_key=", 1)[1]),  # no device lines
    st.just("errno=0\n\n"), st.just("listen_port=1\nerrno=0\n\n"),
    st.just(XPLATFORM_GET[:-1]),  # cut off
    st.text(alphabet="public_key=\nerrno0", max_size=80),
)


def test_a_reply_cuts_the_same_in_two_pieces_wherever_split():
    for reply in (XPLATFORM_GET, XPLATFORM_GET.replace("errno=0", "errno=0\nlisten_port=1")):
        whole = cut(reply, [reply])
        for at in range(len(reply) + 1):
            assert cut(reply, [reply[:at], reply[at:]]) == whole, at


@given(replies, st.lists(st.integers(0, 1000), max_size=12))
def test_a_reply_cuts_the_same_in_any_pieces(reply, offsets):
    """The reply arrives in whatever pieces the socket gives: a separator or the status
    line may be split between two."""
    cuts = sorted({min(offset, len(reply)) for offset in offsets})
    pieces = [reply[a:b] for a, b in zip([0, *cuts], [*cuts, len(reply)], strict=True)]
    assert cut(reply, pieces) == cut(reply, [reply])


# -- the socket client against misbehaving servers --------------------------------------------


@pytest.fixture
def sockdir():
    with tempfile.TemporaryDirectory() as directory:
        yield Path(directory)


async def serve(sockdir: Path, handler):
    requests: list[bytes] = []

    async def on_connect(reader, writer):
        request = await reader.readuntil(b"\n\n")
        requests.append(request)
        await handler(writer)

    server = await asyncio.start_unix_server(on_connect, path=str(sockdir / "wgt0.sock"))
    return server, requests


async def test_get_and_set_over_a_socket(sockdir):
    async def reply(writer):
        writer.write(XPLATFORM_GET.encode() if len(requests) == 1 else b"errno=0\n\n")
        await writer.drain()
        writer.close()

    server, requests = await serve(sockdir, reply)
    async with server:
        device = UapiDevice("wgt0", directory=sockdir)
        state = await device.state()
        assert len(state.peers) == 3
        await device._write([PeerConfig(PEER2, update_only=True, persistent_keepalive=0)])
    assert requests[0] == b"get=1\n\n"
    assert requests[1] == encode_set(
        [PeerConfig(PEER2, update_only=True, persistent_keepalive=0)]).encode()


async def test_a_refused_set_restores_and_raises(sockdir):
    """The server applies nothing and answers errno: the error names interface and op."""
    async def reply(writer):
        writer.write(XPLATFORM_GET.encode() if b"get" in requests[-1] else b"errno=-22\n\n")
        await writer.drain()
        writer.close()

    server, requests = await serve(sockdir, reply)
    async with server:
        device = UapiDevice("wgt0", directory=sockdir)
        with pytest.raises(DeviceError, match=r"uapi: wgt0: set failed: errno 22") as caught:
            await device.set_keepalive(PEER2, 5)
    assert caught.value.errno == 22
    # get (exists?), get (before), set (refused), get (after): unchanged, so nothing restored
    assert [r.split(b"\n")[0] for r in requests] == [b"get=1", b"get=1", b"set=1", b"get=1"]


@pytest.mark.parametrize(
    ("sent", "error", "message"),
    [
        (b"listen_port=1\n", MalformedReply, "truncated"),
        (b"", MalformedReply, "truncated"),
        (b"\xff\xfe=1\nerrno=0\n\n", MalformedReply, "not UTF-8"),
    ],
)
async def test_server_hangs_up_mid_reply(sockdir, sent, error, message):
    async def reply(writer):
        writer.write(sent)
        await writer.drain()
        writer.close()

    server, _ = await serve(sockdir, reply)
    async with server:
        with pytest.raises(error, match=message):
            await UapiDevice("wgt0", directory=sockdir).state()


async def test_a_silent_server_times_out(sockdir):
    release = asyncio.Event()

    async def reply(writer):
        writer.write(b"listen_port=1\n")
        await release.wait()
        writer.close()

    server, _ = await serve(sockdir, reply)
    async with server:
        device = UapiDevice("wgt0", directory=sockdir, timeout_s=0.2)
        with pytest.raises(DeviceError, match=r"no complete reply within 0\.2 s"):
            await device.state()
        release.set()


async def test_missing_or_stale_socket_is_device_not_found(sockdir):
    with pytest.raises(DeviceNotFound, match="no WireGuard device 'wgt0'"):
        await UapiDevice("wgt0", directory=sockdir).state()
    server = await asyncio.start_unix_server(lambda r, w: None, path=str(sockdir / "wgt0.sock"))
    server.close()
    await server.wait_closed()
    (sockdir / "wgt0.sock").touch()  # a leftover file with nobody listening
    with pytest.raises(DeviceNotFound):
        await UapiDevice("wgt0", directory=sockdir).state()


# -- reading changes: only peer blocks that differ from the previous reply are parsed ---------


def peer_block(key: Key, endpoint: str, rx: int = 0) -> str:
    return f"public_key={key.hex()}\nendpoint={endpoint}\nallowed_ip=10.0.0.1/32\nrx_bytes={rx}\n"


def get_reply(*blocks: str) -> str:
    return f"private_key={PRIVATE_HEX}\nlisten_port=51820\n{''.join(blocks)}errno=0\n\n"


PEER3 = Key(bytes([3]) * 32)


async def test_changes_tell_what_differs_from_the_previous_read(sockdir):
    one, two = peer_block(PEER1, "192.0.2.1:1"), peer_block(PEER2, "192.0.2.2:2")
    replies = [
        get_reply(one, two),
        get_reply(two, one),  # another order (wireguard-go's is random): no change
        get_reply(peer_block(PEER1, "192.0.2.1:1", rx=5), peer_block(PEER3, "192.0.2.3:3")),
        get_reply(one, two.replace("rx_bytes=0", "rx_bytes=1e3")),  # a changed block is bad
        get_reply(peer_block(PEER1, "192.0.2.1:1", rx=5), peer_block(PEER3, "192.0.2.3:3")),
    ]

    async def reply(writer):
        writer.write(replies.pop(0).encode())
        await writer.drain()
        writer.close()

    server, _ = await serve(sockdir, reply)
    async with server:
        device = UapiDevice("wgt0", directory=sockdir)
        first = await device.changes()
        assert first.complete and first.removed == ()
        assert [p.public_key for p in first.changed] == [PEER1, PEER2]  # in the reply's order
        assert first.public_key == public_key(Key.from_hex(PRIVATE_HEX, secret=True))
        assert (first.name, first.listen_port) == ("wgt0", 51820)

        same = await device.changes()
        assert not same.complete and (same.changed, same.removed) == ((), ())

        third = await device.changes()
        assert sorted((p.public_key.raw, p.rx_bytes) for p in third.changed) == [
            (PEER3.raw, 0), (PEER1.raw, 5)]  # traffic counters are a change at this layer
        assert third.removed == (PEER2,)

        # The error numbers the line in the whole reply, as a full parse would.
        with pytest.raises(MalformedReply, match=r"line 10: rx_bytes='1e3'"):
            await device.changes()
        # A failed read leaves the previous one as the reference.
        after = await device.changes()
        assert (after.changed, after.removed) == ((), ())
    assert not replies


async def test_a_reply_of_many_pieces(sockdir):
    """A reply far larger than a piece, sent in writes of odd sizes, so that pieces end
    inside two-byte characters (of an unknown key, which is skipped) and inside lines."""
    blocks = [peer_block(Key(i.to_bytes(32, "big")), f"192.0.2.1:{i + 1}") for i in range(3000)]
    reply = get_reply(f"x={'é' * 40000}\n", *blocks)
    assert len(reply.encode()) > 4 * PIECE_BYTES

    async def send(writer):
        data = reply.encode()
        for start in range(0, len(data), 7777):
            writer.write(data[start:start + 7777])
            await writer.drain()
        writer.close()

    server, _ = await serve(sockdir, send)
    async with server:
        device = UapiDevice("wgt0", directory=sockdir)
        assert await device.state() == parse_get(reply, "wgt0")[0]
        first = await device.changes()
    assert first.changed == parse_get(reply, "wgt0")[0].peers


# -- a block whose counters alone moved is made from the peer's previous state ----------------

FULL_BLOCK = (
    f"{PEER1.hex()}\npreshared_key={'0' * 64}\nprotocol_version=1\nendpoint=192.0.2.1:51820\n"
    "last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=5000\ntx_bytes=100\n"
    "rx_bytes=200\npersistent_keepalive_interval=0\nallowed_ip=10.0.0.1/32"
)


@pytest.mark.parametrize("old, new", [
    ("rx_bytes=200", "rx_bytes=18446744073709551615"),  # the largest u64
    ("tx_bytes=100", "tx_bytes=0"),
    ("last_handshake_time_nsec=5000", "last_handshake_time_nsec=999999999"),
    ("last_handshake_time_sec=1700000000", "last_handshake_time_sec=1700000120"),
    ("last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=5000",
     "last_handshake_time_sec=0\nlast_handshake_time_nsec=0"),  # never, again
])
def test_a_counter_change_is_what_a_full_parse_makes(old, new):
    previous, _ = parse_peer(FULL_BLOCK, "wgt0", 1)
    block = FULL_BLOCK.replace(old, new)
    assert update_counters(previous, FULL_BLOCK, block) == parse_peer(block, "wgt0", 1)[0]


@pytest.mark.parametrize("old, new", [
    ("endpoint=192.0.2.1:51820", "endpoint=192.0.2.1:51821"),  # not a counter
    ("persistent_keepalive_interval=0", "persistent_keepalive_interval=25"),
    ("allowed_ip=10.0.0.1/32", "allowed_ip=10.0.0.1/32\nallowed_ip=10.0.0.2/32"),  # a line more
    ("rx_bytes=200", "tx_bytes=200"),  # another key in the line's place
    ("rx_bytes=200", "rx_bytes=-1"),
    ("rx_bytes=200", "rx_bytes=18446744073709551616"),  # one over a u64
    ("tx_bytes=100", "tx_bytes=1e3"),
    ("last_handshake_time_nsec=5000", "last_handshake_time_nsec=1000000000"),
    ("rx_bytes=200", "rx_bytes"),  # not key=value
])
def test_any_other_change_is_left_to_the_full_parse(old, new):
    previous, _ = parse_peer(FULL_BLOCK, "wgt0", 1)
    assert update_counters(previous, FULL_BLOCK, FULL_BLOCK.replace(old, new)) is None


async def test_changes_made_from_counters_equal_a_full_parse(sockdir):
    """Replies in which peers' counters move, and one peer also changes its endpoint: each
    read tells exactly the peers a full parse finds different, as a full parse makes them."""
    keys = [Key(bytes([i]) * 32) for i in range(1, 6)]

    def block(key: Key, rx: int, endpoint: str = "192.0.2.9:9") -> str:
        return (f"public_key={key.hex()}\nendpoint={endpoint}\nlast_handshake_time_sec={rx}\n"
                f"last_handshake_time_nsec=0\ntx_bytes={rx * 2}\nrx_bytes={rx}\n"
                "allowed_ip=10.0.0.1/32\n")

    replies = [
        get_reply(*(block(k, 1) for k in keys)),
        get_reply(*(block(k, 1 + (i % 2)) for i, k in enumerate(keys))),
        get_reply(*(block(k, 3, "192.0.2.9:10" if i == 0 else "192.0.2.9:9")
                    for i, k in enumerate(keys[:4]))),
    ]
    sent = list(replies)

    async def reply(writer):
        writer.write(sent.pop(0).encode())
        await writer.drain()
        writer.close()

    server, _ = await serve(sockdir, reply)
    async with server:
        device = UapiDevice("wgt0", directory=sockdir)
        before = {p.public_key: p for p in (await device.changes()).changed}
        for text in replies[1:]:
            read = await device.changes()
            after = {p.public_key: p for p in parse_get(text, "wgt0")[0].peers}
            assert {p.public_key: p for p in read.changed} == {
                k: p for k, p in after.items() if before.get(k) != p}
            assert set(read.removed) == before.keys() - after.keys()
            before = after
    assert not sent


def test_a_full_parse_reuses_what_it_made_of_unchanged_blocks():
    one, two = peer_block(PEER1, "192.0.2.1:1"), peer_block(PEER2, "192.0.2.2:2")
    parsed: dict = {}
    first, _ = parse_get(get_reply(one, two), "wgt0", parsed)
    again, _ = parse_get(get_reply(two.replace("rx_bytes=0", "rx_bytes=7"), one), "wgt0",
                         parsed)
    assert again.peers[1] is first.peers[0]  # PEER1's block is as it was: the same value
    assert again.peers[0].rx_bytes == 7 and first.peers[1].rx_bytes == 0
    assert again == parse_get(get_reply(two.replace("rx_bytes=0", "rx_bytes=7"), one),
                              "wgt0")[0]
    assert len(parsed) == 2  # this reply's blocks only: the memory does not grow
    # A block parsed before keeps the numbering of the lines after it right.
    with pytest.raises(MalformedReply, match=r"line 10: rx_bytes='1e3'"):
        parse_get(get_reply(one, two.replace("rx_bytes=0", "rx_bytes=1e3")), "wgt0", parsed)
