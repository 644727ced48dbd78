"""WireGuard keys: 32-byte Curve25519 values in the three spellings wgpunch meets.

- base64, 44 characters ending in `=`, as `wg` prints them and as JSON carries them;
- hex, 64 characters, as the UAPI protocol carries them;
- base32 (RFC 4648, `====` padding, 56 characters), as wgsd's DNS-SD labels carry them.

Decoders are strict (exact length, alphabet, zero padding bits), so one key has exactly one
spelling in each form, and an error names the position of the first bad character. A key
marked `secret` (private or preshared) never shows its value through `str`, `repr` or an
error message; only an explicit `.base64()`/`.hex()` call reveals it.
"""

from __future__ import annotations

import base64
import binascii
import functools
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn

from .errors import KeyFormatError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

KEY_LEN = 32
BASE64_LEN = 44
HEX_LEN = 64
BASE32_LEN = 56

_B64_ALPHABET = frozenset(string.ascii_letters + string.digits + "+/")
_B32_ALPHABET = frozenset(string.ascii_uppercase + "234567")
_HEX_ALPHABET = frozenset(string.hexdigits)


@dataclass(frozen=True, slots=True)
class Key:
    raw: bytes
    secret: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != KEY_LEN:
            size = len(self.raw) if isinstance(self.raw, bytes | bytearray) else "?"
            raise KeyFormatError(f"keys: a key is {KEY_LEN} bytes, got {size}")

    # -- decoding ---------------------------------------------------------------------------

    @classmethod
    def from_base64(cls, text: str, *, what: str = "key", secret: bool = False) -> Key:
        _check_length(text, BASE64_LEN, what, secret, "base64")
        for pos, char in enumerate(text[:43]):
            if char not in _B64_ALPHABET:
                _fail(text, what, secret, f"invalid base64 character at position {pos + 1}")
        if text[43] != "=":
            _fail(text, what, secret, "position 44 must be the '=' padding")
        raw = base64.b64decode(text, validate=True)
        if base64.b64encode(raw).decode() != text:
            _fail(text, what, secret, "non-zero padding bits at position 43 (not canonical)")
        return cls(raw, secret)

    @classmethod
    def from_hex(cls, text: str, *, what: str = "key", secret: bool = False) -> Key:
        # The common case at C speed (a poll of a large device decodes many keys): 64
        # letters and digits that `bytes.fromhex` takes. It skips whitespace, hence the
        # `isalnum`; anything else falls through to the checks that name the fault.
        if isinstance(text, str) and len(text) == HEX_LEN and text.isascii() and text.isalnum():
            try:
                return cls(bytes.fromhex(text), secret)
            except ValueError:
                pass
        _check_length(text, HEX_LEN, what, secret, "hex")
        for pos, char in enumerate(text):
            if char not in _HEX_ALPHABET:
                _fail(text, what, secret, f"invalid hex character at position {pos + 1}")
        return cls(bytes.fromhex(text), secret)

    @classmethod
    def from_base32(cls, text: str, *, what: str = "key", secret: bool = False) -> Key:
        _check_length(text, BASE32_LEN, what, secret, "base32")
        upper = text.upper()
        for pos, char in enumerate(upper[:52]):
            if char not in _B32_ALPHABET:
                _fail(text, what, secret, f"invalid base32 character at position {pos + 1}")
        if upper[52:] != "====":
            _fail(text, what, secret, "positions 53-56 must be the '====' padding")
        try:
            raw = base64.b32decode(upper)
        except binascii.Error:  # pragma: no cover - the checks above leave nothing to fail
            _fail(text, what, secret, "invalid base32")
        if base64.b32encode(raw).decode() != upper:
            _fail(text, what, secret, "non-zero padding bits at position 52 (not canonical)")
        return cls(raw, secret)

    @classmethod
    def parse(cls, text: str, *, what: str = "key", secret: bool = False) -> Key:
        """Accept any of the three spellings, told apart by length."""
        decoders = {BASE64_LEN: cls.from_base64, HEX_LEN: cls.from_hex, BASE32_LEN: cls.from_base32}
        decoder = decoders.get(len(text))
        if decoder is None:
            _fail(
                text,
                what,
                secret,
                f"length {len(text)}: want {BASE64_LEN} (base64), {HEX_LEN} (hex) "
                f"or {BASE32_LEN} (base32) characters",
            )
        return decoder(text, what=what, secret=secret)

    # -- encoding ---------------------------------------------------------------------------

    def base64(self) -> str:
        return base64.b64encode(self.raw).decode()

    def hex(self) -> str:
        return self.raw.hex()

    def base32(self) -> str:
        """Lowercase base32 with padding: the DNS-SD label form."""
        return base64.b32encode(self.raw).decode().lower()

    def is_zero(self) -> bool:
        return self.raw == bytes(KEY_LEN)

    def __str__(self) -> str:
        return "(hidden)" if self.secret else self.base64()

    def __repr__(self) -> str:
        return "Key(<secret>)" if self.secret else f"Key({self.base64()!r})"


# cryptography is imported by the two functions that use it: most commands (and `--help`)
# parse and print keys but never derive one, and the import costs 7-50 ms.


def generate_private_key() -> Key:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    return Key(X25519PrivateKey.generate().private_bytes_raw(), secret=True)


def public_key(private: Key) -> Key:
    """Derive the public key (X25519 base-point multiplication, with WireGuard's clamping)."""
    return Key(_private_key_of()(private.raw).public_key().public_bytes_raw())


@functools.cache
def _private_key_of() -> Callable[[bytes], X25519PrivateKey]:
    """`X25519PrivateKey.from_private_bytes`, or rather the Rust binding that it returns, where
    there is one: the public method first asks the OpenSSL backend whether X25519 is supported,
    and importing the backend loads ~40 modules (21 ms in a bare interpreter, ~10 ms on top of
    what a node has loaded before its first device read: bench/startup.py)."""
    try:
        from cryptography.hazmat.bindings._rust import openssl

        return openssl.x25519.from_private_bytes
    except (ImportError, AttributeError):  # a cryptography that keeps it elsewhere
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        return X25519PrivateKey.from_private_bytes


def generate_keypair() -> tuple[Key, Key]:
    private = generate_private_key()
    return private, public_key(private)


def _shown(text: str, secret: bool) -> str:
    return "" if secret else f" {text[:80]!r}"


def _fail(text: str, what: str, secret: bool, reason: str) -> NoReturn:
    raise KeyFormatError(f"keys: bad {what}{_shown(text, secret)}: {reason}")


def _check_length(text: str, want: int, what: str, secret: bool, form: str) -> None:
    if not isinstance(text, str):
        raise KeyFormatError(f"keys: bad {what}: expected text, got {type(text).__name__}")
    if len(text) != want:
        _fail(text, what, secret, f"length {len(text)}, a {form} key is {want} characters")
