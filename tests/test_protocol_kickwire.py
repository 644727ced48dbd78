"""protocol/kickwire.py: the registry's kick, golden bytes both ways, and every malformed one
is one MalformedPacket naming what is wrong."""

import pytest

from wgpunch.errors import MalformedPacket
from wgpunch.protocol.kickwire import Kick, encode_kick, parse_kick

KICK = Kick("66a34b2dd63970fe", 8)
KICK_BYTES = b"WGKK" + bytes([1, 16]) + (8).to_bytes(8, "big") + b"66a34b2dd63970fe"


def test_golden_kick():
    assert encode_kick(KICK) == KICK_BYTES
    assert parse_kick(KICK_BYTES) == KICK


@pytest.mark.parametrize("kick", [Kick("e", 0), Kick("x" * 64, (1 << 64) - 1)])
def test_round_trip_at_the_limits(kick):
    assert parse_kick(encode_kick(kick)) == kick


@pytest.mark.parametrize("kick", [Kick("", 1), Kick("x" * 65, 1), Kick("e", -1),
                                  Kick("e", 1 << 64)])
def test_a_kick_out_of_range_is_not_encoded(kick):
    with pytest.raises(ValueError, match="kick:"):
        encode_kick(kick)


@pytest.mark.parametrize("data, why", [
    (b"", "0 bytes, at least 14"),
    (KICK_BYTES[:13], "13 bytes"),
    (b"WGNP" + KICK_BYTES[4:], "magic"),
    (KICK_BYTES[:4] + bytes([2]) + KICK_BYTES[5:], "version 2"),
    (KICK_BYTES[:5] + bytes([0]) + KICK_BYTES[6:14], "with an epoch of 0"),
    (KICK_BYTES[:5] + bytes([17]) + KICK_BYTES[6:], "with an epoch of 17"),
    (KICK_BYTES + b"x", "31 bytes with an epoch of 16"),
    (KICK_BYTES[:14] + b"66a34b2dd63970f\n", "printable"),
])
def test_malformed_kicks(data, why):
    with pytest.raises(MalformedPacket, match=why):
        parse_kick(data)
