"""The parsing of the API's queries and paths (docs/api.md): text in, validated values or one
`MalformedMessage` out. The JSON forms of records and events are the protocol's
(protocol/codec.py)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..errors import KeyFormatError, MalformedMessage
from ..keys import Key

_SINCE = re.compile(r"[0-9]{1,19}")  # a revision: an unsigned 64-bit integer, no sign
_EPOCH = re.compile(r"[0-9a-f]{1,64}")
WATCH_PARAMS = ("since", "epoch")


def only_params(pairs: Iterable[tuple[str, str]], allowed: Iterable[str]) -> dict[str, str]:
    """Query parameters as a dict: each at most once, none outside `allowed`."""
    allowed = tuple(allowed)
    params: dict[str, str] = {}
    for name, value in pairs:
        if name not in allowed:
            what = ", ".join(allowed) if allowed else "none"
            raise MalformedMessage(f"query: unknown parameter {name[:40]!r}; allowed: {what}")
        if name in params:
            raise MalformedMessage(f"query: parameter {name!r} given twice")
        params[name] = value
    return params


def watch_query(pairs: Iterable[tuple[str, str]]) -> tuple[int | None, str | None]:
    """`since` (a revision) and `epoch` (lowercase hex) of `GET /v1/watch`, both optional."""
    params = only_params(pairs, WATCH_PARAMS)
    since_text, epoch = params.get("since"), params.get("epoch")
    since = None
    if since_text is not None:
        if not _SINCE.fullmatch(since_text) or int(since_text) >= 1 << 63:
            raise MalformedMessage(
                f"query: since={since_text[:40]!r} is not a revision (0 or more)")
        since = int(since_text)
    if epoch is not None and not _EPOCH.fullmatch(epoch):
        raise MalformedMessage(f"query: epoch={epoch[:40]!r} is not lowercase hex")
    return since, epoch


def path_key(text: str) -> Key:
    """A peer named in a URL path: base64 (percent-encoded), hex or base32."""
    try:
        return Key.parse(text, what="peer key in path")
    except KeyFormatError as exc:
        raise MalformedMessage(str(exc)) from None
