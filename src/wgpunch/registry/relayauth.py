"""How the registry and a relay on another host know each other: both hold one shared secret,
and every control request (relaycontrol.py) and its answer carries an HMAC-SHA256 of what it
says, keyed with it. No sockets and no clock (`now` is an argument); `read_secret` reads
the secret's file.

    X-Wgpunch-Relay: t=<unix seconds>,n=<nonce, 32 hex>,s=<HMAC, 64 hex>   (request)
    X-Wgpunch-Relay: s=<HMAC, 64 hex>                                      (answer)

    request MAC = HMAC(secret, "request\n" METHOD "\n" PATH "\n" t "\n" n "\n" BODY)
    answer MAC  = HMAC(secret, "answer\n" n "\n" STATUS "\n" BODY)

A request is taken once: within `window_s` of the relay's clock and with a nonce not seen
in that window (a replayed allocation would let a node's side of its slot move). The answer's
MAC names the request's nonce, so an answer cannot be replayed onto another request. The
secret never leaves the two hosts and is never logged; the MACs hide it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from pathlib import Path

from .. import config
from ..errors import ConfigError, RequestRefused

HEADER = "X-Wgpunch-Relay"
# Our choice: far above the clock difference of two NTP-synced hosts plus a request's time
# on the way, short enough that the nonces kept for it stay few.
WINDOW_S = 30.0
MIN_SECRET = 32  # characters: 128 bits as hex
_REQUEST = re.compile(r"t=(\d{1,12}),n=([0-9a-f]{32}),s=([0-9a-f]{64})")
_ANSWER = re.compile(r"s=([0-9a-f]{64})")


def _mac(secret: bytes, *parts: bytes) -> str:
    return hmac.new(secret, b"\n".join(parts), hashlib.sha256).hexdigest()


def sign_request(secret: bytes, method: str, path: str, body: bytes, now: float,
                 nonce: str | None = None) -> tuple[str, str]:
    """The header value for a request, and its nonce (the answer's MAC names it)."""
    nonce = nonce or secrets.token_hex(16)
    stamp = str(int(now))
    mac = _mac(secret, b"request", method.encode(), path.encode(), stamp.encode(),
               nonce.encode(), body)
    return f"t={stamp},n={nonce},s={mac}", nonce


def sign_answer(secret: bytes, nonce: str, status: int, body: bytes) -> str:
    return f"s={_mac(secret, b'answer', nonce.encode(), str(status).encode(), body)}"


def answer_matches(secret: bytes, header: str | None, nonce: str, status: int,
                   body: bytes) -> bool:
    match = None if header is None else _ANSWER.fullmatch(header)
    return match is not None and hmac.compare_digest(
        match.group(1), _mac(secret, b"answer", nonce.encode(), str(status).encode(), body))


class Verifier:
    """The relay's check of control requests: MAC, time and nonce."""

    def __init__(self, secret: bytes, window_s: float = WINDOW_S) -> None:
        self.secret = secret
        self.window_s = window_s
        self._seen: dict[str, float] = {}  # nonce -> its request's time

    def verify(self, header: str | None, method: str, path: str, body: bytes,
               now: float) -> str:
        """The request's nonce, or the refusal (401)."""
        match = None if header is None else _REQUEST.fullmatch(header)
        if match is None:
            raise RequestRefused(f"relay control: no valid {HEADER} header", 401)
        stamp, nonce, mac = match.groups()
        if not hmac.compare_digest(mac, _mac(self.secret, b"request", method.encode(),
                                             path.encode(), stamp.encode(), nonce.encode(),
                                             body)):
            raise RequestRefused("relay control: wrong MAC (not signed with our secret)", 401)
        if abs(now - int(stamp)) > self.window_s:
            raise RequestRefused(f"relay control: request time {stamp} is more than "
                                 f"{self.window_s:g} s from ours ({int(now)})", 401)
        self._seen = {n: t for n, t in self._seen.items() if now - t <= 2 * self.window_s}
        if nonce in self._seen:
            raise RequestRefused("relay control: a request seen before (replayed)", 401)
        self._seen[nonce] = int(stamp)
        return nonce


def read_secret(path: Path, layer: str) -> bytes:
    """The shared secret in `path` (config.read_token's rules: one printable word, a file
    others cannot read), at least MIN_SECRET characters: it is all that keeps strangers
    from handing out the relay's slots."""
    secret = config.read_token(path, layer)
    if len(secret) < MIN_SECRET:
        raise ConfigError(f"{layer}: relay secret file {str(path)!r} holds fewer than "
                          f"{MIN_SECRET} characters (make one: openssl rand -hex 32)")
    return secret.encode()
