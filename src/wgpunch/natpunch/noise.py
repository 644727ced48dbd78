"""Noise_IK_25519_ChaChaPoly_BLAKE2s, as natpunch-go speaks it (Noise Protocol Framework rev 34).

Only what natpunch needs: the IK pattern (`<- s ... -> e, es, s, ss  <- e, ee, se`), no PSK,
no rekey, and transport `CipherState`s driven with explicit nonces, because natpunch-go sends
each message's counter in clear and checks it against a replay window (`ReplayWindow`).
X25519 and ChaCha20-Poly1305 come from `cryptography`; HASH is BLAKE2s (HASHLEN 32, BLOCKLEN
64) and HKDF is the spec's HMAC-BLAKE2s construction.

Choices the spec leaves open, made here:
- A DH whose output is all zeros (a low-order or otherwise invalid peer key) raises
  `NoiseError` (spec §12.1 allows this; OpenSSL refuses to produce that output anyway).
- A failed `read_message` or `write_message` leaves the `HandshakeIK` exactly as it was: a
  client waiting for message 2 can drop a forged or stale one and still read the genuine one
  (natpunch-go's client crashes there). The spec's "delete the HandshakeState" is then up to
  the caller.
- Handshake messages longer than 65535 bytes (the spec's limit) are refused both ways.
- `handshake_hash` and `split()` are only available once the handshake is complete.
Private keys are 32 raw bytes used as X25519 scalars (clamped by X25519), so a WireGuard
private key serves directly as the static key.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, replace

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ..errors import NoiseError

PROTOCOL_NAME = b"Noise_IK_25519_ChaChaPoly_BLAKE2s"

DHLEN = 32
KEYLEN = 32
TAGLEN = 16
MAX_MESSAGE = 65535
# 2**64-1 is reserved by the spec (§5.1) and never used as a nonce.
MAX_NONCE = 2**64 - 2
# e ‖ enc(s) ‖ enc(payload) and e ‖ enc(payload): the sizes before the payload's own bytes.
MSG1_OVERHEAD = DHLEN + (DHLEN + TAGLEN) + TAGLEN
MSG2_OVERHEAD = DHLEN + TAGLEN


def _hash(data: bytes) -> bytes:
    return hashlib.blake2s(data).digest()


def _hkdf(chaining_key: bytes, input_key_material: bytes) -> tuple[bytes, bytes]:
    # Two outputs only: the third is for MixKeyAndHash, which only PSK patterns use.
    temp_key = hmac.digest(chaining_key, input_key_material, hashlib.blake2s)
    output1 = hmac.digest(temp_key, b"\x01", hashlib.blake2s)
    output2 = hmac.digest(temp_key, output1 + b"\x02", hashlib.blake2s)
    return output1, output2


def _private_key(raw: bytes, what: str) -> X25519PrivateKey:
    if len(raw) != DHLEN:
        raise NoiseError(f"noise: {what} must be {DHLEN} bytes, got {len(raw)}")
    return X25519PrivateKey.from_private_bytes(bytes(raw))


def _public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _dh(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:
        raise NoiseError("noise: DH with a low-order public key gives no shared secret") from exc


def public_key(private: bytes) -> bytes:
    """The X25519 public key (32 bytes) of a 32-byte private key."""
    return _public_bytes(_private_key(private, "private key"))


def _nonce_bytes(nonce: int) -> bytes:
    if not 0 <= nonce <= MAX_NONCE:
        raise NoiseError(f"noise: nonce {nonce} outside 0..2**64-2")
    return bytes(4) + nonce.to_bytes(8, "little")


class CipherState:
    """ChaCha20-Poly1305 under one key, with the nonce given on every call.

    Noise's CipherState counts its own nonce; natpunch-go sets it per message from the clear
    counter instead (spec §11.4), so this object holds only the key. Never encrypt twice with
    one nonce under one key.

    The key is kept as bytes and the AEAD object made per message: that costs 0.7 us, while
    keeping one costs ~2.2 KiB outside the Python heap, and a rendezvous server holds two per
    session, up to 131,072 sessions (bench/natpunch.py: 5.7 KiB per registered key before).
    """

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) != KEYLEN:
            raise NoiseError(f"noise: cipher key must be {KEYLEN} bytes, got {len(key)}")
        self._key = bytes(key)

    def encrypt(self, nonce: int, ad: bytes, plaintext: bytes) -> bytes:
        return ChaCha20Poly1305(self._key).encrypt(_nonce_bytes(nonce), plaintext, ad)

    def decrypt(self, nonce: int, ad: bytes, ciphertext: bytes) -> bytes:
        nonce_bytes = _nonce_bytes(nonce)
        if len(ciphertext) < TAGLEN:
            raise NoiseError(f"noise: ciphertext of {len(ciphertext)} bytes has no room for a tag")
        try:
            return ChaCha20Poly1305(self._key).decrypt(nonce_bytes, ciphertext, ad)
        except InvalidTag as exc:
            raise NoiseError("noise: authentication failed") from exc


@dataclass(slots=True)
class _SymmetricState:
    """The spec's SymmetricState (§5.2); copied before each message so failures change nothing."""

    ck: bytes
    h: bytes
    # Empty until the first MixKey. IK encrypts nothing before `es`, so the empty key is never
    # used (and CipherState would refuse it).
    k: bytes = b""
    n: int = 0

    @classmethod
    def initialize(cls) -> _SymmetricState:
        # The name is 33 bytes, longer than HASHLEN, so §5.2 says hash it.
        h = _hash(PROTOCOL_NAME)
        return cls(ck=h, h=h)

    def mix_key(self, input_key_material: bytes) -> None:
        self.ck, self.k = _hkdf(self.ck, input_key_material)
        self.n = 0

    def mix_hash(self, data: bytes) -> None:
        self.h = _hash(self.h + data)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = CipherState(self.k).encrypt(self.n, self.h, plaintext)
        self.n += 1
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = CipherState(self.k).decrypt(self.n, self.h, ciphertext)
        self.n += 1
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        temp_k1, temp_k2 = _hkdf(self.ck, b"")
        return CipherState(temp_k1), CipherState(temp_k2)


class HandshakeIK:
    """One side of a Noise IK handshake: initiator writes message 1, responder answers with 2.

    Build it with `initiator()` or `responder()`. `ephemeral_private` fixes the ephemeral key
    (test vectors only); otherwise a fresh one is generated for the message that needs it.
    """

    def __init__(
        self,
        *,
        is_initiator: bool,
        static_private: bytes,
        remote_static: bytes | None,
        prologue: bytes,
        ephemeral_private: bytes | None,
    ) -> None:
        self._initiator = is_initiator
        self._s = _private_key(static_private, "static private key")
        self._e_fixed = (
            None
            if ephemeral_private is None
            else _private_key(ephemeral_private, "ephemeral private key")
        )
        self._e: X25519PrivateKey | None = None
        self._re: bytes | None = None
        self._rs = remote_static
        # Messages processed so far: 0, 1, or 2 (complete).
        self._step = 0
        self._sym = _SymmetricState.initialize()
        self._sym.mix_hash(bytes(prologue))
        # IK's pre-message `<- s`: both sides hash the responder's static public key.
        self._sym.mix_hash(remote_static if remote_static is not None else _public_bytes(self._s))

    @classmethod
    def initiator(
        cls,
        static_private: bytes,
        remote_static: bytes,
        prologue: bytes,
        *,
        ephemeral_private: bytes | None = None,
    ) -> HandshakeIK:
        if len(remote_static) != DHLEN:
            raise NoiseError(f"noise: remote static key must be {DHLEN} bytes")
        return cls(
            is_initiator=True,
            static_private=static_private,
            remote_static=bytes(remote_static),
            prologue=prologue,
            ephemeral_private=ephemeral_private,
        )

    @classmethod
    def responder(
        cls,
        static_private: bytes,
        prologue: bytes,
        *,
        ephemeral_private: bytes | None = None,
    ) -> HandshakeIK:
        return cls(
            is_initiator=False,
            static_private=static_private,
            remote_static=None,
            prologue=prologue,
            ephemeral_private=ephemeral_private,
        )

    @property
    def remote_static(self) -> bytes | None:
        """The peer's static public key: given to an initiator, learnt by a responder."""
        return self._rs

    @property
    def complete(self) -> bool:
        return self._step == 2

    @property
    def handshake_hash(self) -> bytes:
        """h after the last message, for channel binding (spec §11.2)."""
        self._require_complete()
        return self._sym.h

    def split(self) -> tuple[CipherState, CipherState]:
        """(initiator→responder, responder→initiator) transport ciphers."""
        self._require_complete()
        return self._sym.split()

    def write_message(self, payload: bytes) -> bytes:
        if self._initiator:
            self._expect_step(0, "write message 1")
            overhead = MSG1_OVERHEAD
        else:
            self._expect_step(1, "write message 2")
            overhead = MSG2_OVERHEAD
        if overhead + len(payload) > MAX_MESSAGE:
            raise NoiseError(f"noise: payload of {len(payload)} bytes exceeds the message limit")
        e = X25519PrivateKey.generate() if self._e_fixed is None else self._e_fixed
        e_public = _public_bytes(e)
        sym = replace(self._sym)
        sym.mix_hash(e_public)  # e
        if self._initiator:
            assert self._rs is not None  # an initiator is always built with it
            sym.mix_key(_dh(e, self._rs))  # es
            encrypted_static = sym.encrypt_and_hash(_public_bytes(self._s))  # s
            sym.mix_key(_dh(self._s, self._rs))  # ss
            message = e_public + encrypted_static + sym.encrypt_and_hash(bytes(payload))
        else:
            assert self._re is not None and self._rs is not None  # read from message 1
            sym.mix_key(_dh(e, self._re))  # ee
            sym.mix_key(_dh(e, self._rs))  # se
            message = e_public + sym.encrypt_and_hash(bytes(payload))
        self._sym, self._e = sym, e
        self._step += 1
        return message

    def read_message(self, message: bytes) -> bytes:
        if self._initiator:
            self._expect_step(1, "read message 2")
            overhead = MSG2_OVERHEAD
        else:
            self._expect_step(0, "read message 1")
            overhead = MSG1_OVERHEAD
        if not overhead <= len(message) <= MAX_MESSAGE:
            raise NoiseError(
                f"noise: message of {len(message)} bytes, need {overhead}..{MAX_MESSAGE}"
            )
        message = bytes(message)
        re, rest = message[:DHLEN], message[DHLEN:]
        sym = replace(self._sym)
        sym.mix_hash(re)  # e
        if self._initiator:
            assert self._e is not None  # written with message 1
            sym.mix_key(_dh(self._e, re))  # ee
            sym.mix_key(_dh(self._s, re))  # se
            rs = self._rs
        else:
            sym.mix_key(_dh(self._s, re))  # es
            rs = sym.decrypt_and_hash(rest[: DHLEN + TAGLEN])  # s
            rest = rest[DHLEN + TAGLEN :]
            sym.mix_key(_dh(self._s, rs))  # ss
        payload = sym.decrypt_and_hash(rest)
        self._sym, self._re, self._rs = sym, re, rs
        self._step += 1
        return payload

    def _expect_step(self, step: int, action: str) -> None:
        if self._step != step:
            role = "initiator" if self._initiator else "responder"
            state = "complete" if self.complete else f"after {self._step} message(s)"
            raise NoiseError(f"noise: {role} cannot {action} now ({state})")

    def _require_complete(self) -> None:
        if not self.complete:
            raise NoiseError("noise: handshake not complete")


_MAX_COUNTER = 2**64 - 1


class ReplayWindow:
    """Accepts each 64-bit counter at most once, within `size` of the highest one seen.

    The RFC 6479 idea (a bitmap sliding along with the highest counter) with a Python int as
    the bitmap; the RFC's ring of blocks only exists to make shifting cheap in C. Accepted are
    the highest counter so far and the `size - 1` below it, each once. Feed it only counters of
    messages that authenticated, or a forger could slide the window forward.
    """

    __slots__ = ("_bits", "_mask", "_size", "_top")

    def __init__(self, size: int = 1024) -> None:
        if size < 1:
            raise ValueError(f"replay window size must be positive, got {size}")
        self._size = size
        self._mask = (1 << size) - 1
        self._top = 0
        # Bit i set: counter `_top - i` was accepted.
        self._bits = 0

    def accept(self, counter: int) -> bool:
        if not 0 <= counter <= _MAX_COUNTER:
            return False
        if counter > self._top:
            shift = counter - self._top
            # A jump past the whole window forgets everything; skip the huge shift.
            self._bits = ((self._bits << shift) & self._mask) | 1 if shift < self._size else 1
            self._top = counter
            return True
        offset = self._top - counter
        if offset >= self._size or (self._bits >> offset) & 1:
            return False
        self._bits |= 1 << offset
        return True
