import base64
import shutil
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wgpunch.errors import KeyFormatError
from wgpunch.keys import Key, generate_keypair, generate_private_key, public_key

keys32 = st.binary(min_size=32, max_size=32)

# wgsd's own vectors (shared/reference/wgsd.md §1.2): base64 as `wg` prints, base32 label.
WGSD_VECTORS = [
    ("xScVkH3fUGUv4RrJFfmcqm8rs3SEHr41km6+yffAHw4=",
     "yutrled535igkl7bdlerl6m4vjxsxm3uqqpl4nmsn27mt56ad4ha===="),
    ("syKB97XhGnvC+kynh2KqQJPXoOoOpx/HmpMRTc+r4js=",
     "wmrid55v4enhxqx2jstyoyvkicj5pihkb2tr7r42smiu3t5l4i5q===="),
    ("AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
     "aeaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa===="),
]


@pytest.mark.parametrize(("b64", "b32"), WGSD_VECTORS)
def test_base32_matches_wgsd_labels(b64, b32):
    key = Key.from_base64(b64)
    assert key.base32() == b32
    assert Key.from_base32(b32) == key
    assert Key.from_base32(b32.upper()) == key  # DNS names match case-insensitively


@given(keys32)
def test_every_form_round_trips(raw):
    key = Key(raw)
    assert Key.from_base64(key.base64()) == key
    assert Key.from_hex(key.hex()) == key
    assert Key.from_hex(key.hex().upper()) == key
    assert Key.from_base32(key.base32()) == key
    assert Key.parse(key.base64()) == Key.parse(key.hex()) == Key.parse(key.base32()) == key


def test_rfc7748_x25519_vector():
    # RFC 7748 §6.1: Alice's private key and the public key derived from it.
    private = Key.from_hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
                           secret=True)
    expected = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    assert public_key(private).hex() == expected


@given(keys32)
def test_public_key_is_what_cryptographys_public_api_derives(raw):
    # public_key() skips the public class (and its backend check) where it can: same result.
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    expected = X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes_raw()
    assert public_key(Key(raw, secret=True)).raw == expected


def test_a_cryptography_without_the_binding_where_we_look_derives_through_its_public_api(
        monkeypatch):
    import sys

    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from wgpunch import keys

    private, public = generate_keypair()
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.bindings._rust", None)
    keys._private_key_of.cache_clear()
    try:
        assert public_key(private) == public
        assert keys._private_key_of() == X25519PrivateKey.from_private_bytes
    finally:
        keys._private_key_of.cache_clear()


@pytest.mark.skipif(shutil.which("wg") is None, reason="wireguard-tools (wg) is not installed")
def test_public_key_agrees_with_wg_pubkey():
    private, public = generate_keypair()
    done = subprocess.run(["wg", "pubkey"], input=private.base64() + "\n", capture_output=True,
                          text=True, check=True)
    assert done.stdout.strip() == public.base64()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "length 0"),
        ("AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "length 43"),
        ("AQAAAAAAAAAAAAAAAAAAAAAA*AAAAAAAAAAAAAAAAAA=", "invalid base64 character at position 25"),
        ("AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "position 44 must be the '=' padding"),
        ("AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAB=", "non-zero padding bits"),
    ],
)
def test_bad_base64_names_the_position(text, message):
    with pytest.raises(KeyFormatError, match=message):
        Key.from_base64(text)


def test_bad_hex_and_base32_name_the_position():
    with pytest.raises(KeyFormatError, match="invalid hex character at position 3"):
        Key.from_hex("00g" + "0" * 61)
    # What `bytes.fromhex` would take (whitespace) or that only looks like digits is refused.
    with pytest.raises(KeyFormatError, match="invalid hex character at position 3"):
        Key.from_hex("00 " + "0" * 61)
    with pytest.raises(KeyFormatError, match="invalid hex character at position 1"):
        Key.from_hex("\u0663" + "0" * 63)  # ARABIC-INDIC DIGIT THREE: isdigit, not hex
    with pytest.raises(KeyFormatError, match="invalid base32 character at position 2"):
        Key.from_base32("a1" + "a" * 50 + "====")
    with pytest.raises(KeyFormatError, match="positions 53-56"):
        Key.from_base32("a" * 56)
    with pytest.raises(KeyFormatError, match="want 44 \\(base64\\), 64 \\(hex\\) or 56"):
        Key.parse("short")


def test_a_secret_key_never_shows_its_value():
    private = generate_private_key()
    b64 = private.base64()
    assert b64 not in str(private) and b64 not in repr(private)
    assert b64 not in f"{private} {private!r} {[private]}"
    broken = b64[:10] + "*" + b64[11:]
    with pytest.raises(KeyFormatError) as caught:
        Key.from_base64(broken, what="private key", secret=True)
    assert broken not in str(caught.value) and b64[:10] not in str(caught.value)
    assert "private key" in str(caught.value) and "position 11" in str(caught.value)


def test_public_key_prints_as_wg_does():
    raw = bytes(range(32))
    assert str(Key(raw)) == base64.b64encode(raw).decode()


def test_key_length_is_checked():
    with pytest.raises(KeyFormatError, match="32 bytes, got 31"):
        Key(bytes(31))
