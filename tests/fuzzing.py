"""Strategies for the fuzz tests (docs/fuzzing.md): inputs grown from seed corpora.

Every parser of bytes from the network or a device is fuzzed with arbitrary bytes and with
mutations of valid messages taken from its golden tests; random bytes alone rarely get past
a parser's first check. Hypothesis draws each mutation step, so a failure shrinks to a seed
and the fewest steps that break it.

`FUZZ` is the settings profile every fuzz test uses: a CI-sized run by default, or
`WGPUNCH_FUZZ_EXAMPLES` examples each (registered in tests/conftest.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import settings
from hypothesis import strategies as st

FUZZ = settings.get_profile("wgpunch-fuzz")


def fuzz_settings(scale: float) -> settings:
    """FUZZ with `scale` times as many examples, for a test whose examples are cheap (or
    worth more)."""
    return settings(FUZZ, max_examples=max(1, round(FUZZ.max_examples * scale)))

# Bytes that mean something to the parsers fuzzed here: length and count fields at their
# edges, a DNS compression pointer (0xc0), UTF-8 lead and continuation bytes, text
# separators of UAPI (`=`, newline) and JSON.
SPECIAL_BYTES = (0x00, 0x01, 0x02, 0x03, 0x7F, 0x80, 0xC0, 0xFF, 0x3F, 0x40, 0xC3, 0xE2,
                 ord("="), ord("\n"), ord("-"), ord("9"), ord('"'), ord("{"), ord("["))


@st.composite
def mutated(draw: st.DrawFn, seeds: Sequence[bytes], max_steps: int = 6) -> bytes:
    """One of `seeds`, changed by 1 to `max_steps` of: a byte set (often to a special value),
    a bit flipped, a cut, bytes inserted, a stretch deleted or repeated, a stretch of another
    seed spliced in."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, max_steps))):
        step = draw(st.integers(0, 6))
        at = draw(st.integers(0, len(data)))
        if step == 0 and data:
            value = draw(st.sampled_from(SPECIAL_BYTES) | st.integers(0, 255))
            data[min(at, len(data) - 1)] = value
        elif step == 1 and data:
            data[min(at, len(data) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif step == 2:
            del data[at:]
        elif step == 3:
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif step == 4:
            del data[at:at + draw(st.integers(1, 16))]
        elif step == 5:
            end = at + draw(st.integers(1, 32))
            data[end:end] = data[at:end] * draw(st.integers(1, 3))
        else:
            other = draw(st.sampled_from(seeds))
            start = draw(st.integers(0, len(other)))
            data[at:at + draw(st.integers(0, 16))] = other[start:start + draw(st.integers(1, 32))]
    return bytes(data)


@st.composite
def mutated_lines(draw: st.DrawFn, seeds: Sequence[bytes], values: Sequence[bytes],
                  max_steps: int = 4) -> bytes:
    """A line-based seed (UAPI) changed line by line: a line deleted, repeated, moved, or its
    value (after the first `=`) replaced by one of `values` or by random bytes."""
    lines = draw(st.sampled_from(seeds)).split(b"\n")
    for _ in range(draw(st.integers(1, max_steps))):
        at = draw(st.integers(0, len(lines) - 1))
        step = draw(st.integers(0, 3))
        if step == 0 and len(lines) > 1:
            del lines[at]
        elif step == 1:
            lines.insert(at, lines[at])
        elif step == 2:
            lines.insert(draw(st.integers(0, len(lines))), lines.pop(at))
        else:
            key, sep, _ = lines[at].partition(b"=")
            value = draw(st.sampled_from(values) | st.binary(max_size=24))
            lines[at] = key + (sep or b"=") + value
    return b"\n".join(lines)


def fuzz_input(seeds: Sequence[bytes], max_size: int) -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, or a mutated seed (three times as often)."""
    return st.one_of(st.binary(max_size=max_size), mutated(seeds), mutated(seeds),
                     mutated(seeds))


def nested(depth: int) -> list[object]:
    """`depth` lists, one inside the other."""
    value: list[object] = []
    for _ in range(depth - 1):
        value = [value]
    return value


# JSON values that sit on a reader's edges: huge and non-finite numbers (Python's json reads
# `Infinity` and `1e999`), wrong types, deep nesting, long and odd text.
NASTY_JSON = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
    st.sampled_from([float("inf"), -float("inf"), 10**400, -(2**64), 2**64, 0.5, ""]),
    st.text(max_size=30),
    st.sampled_from(["10.0.0.1/33", "256.0.0.1", "[::1]:0", "1.2.3.4:65536", "x" * 5000,
                     "AAAA", "=" * 44, "\x00", "\ud800"]),
    st.integers(1, 60).map(nested),
    st.lists(st.none() | st.integers() | st.text(max_size=5), max_size=4),
    st.dictionaries(st.text(max_size=8), st.none() | st.integers(), max_size=3),
)


@st.composite
def mutated_json(draw: st.DrawFn, seeds: Sequence[object], max_steps: int = 3) -> bytes:
    """One of `seeds` (JSON values) with 1 to `max_steps` values somewhere inside replaced by
    nasty ones, keys removed or added; encoded as JSON text (Python's dialect: `Infinity`)."""
    import copy
    import json

    value = copy.deepcopy(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, max_steps))):
        # Walk down to a random container, then change one of its entries.
        node, parent, key = value, None, None
        while isinstance(node, dict | list) and node and draw(st.booleans()):
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            parent, key = node, draw(st.sampled_from(keys))
            node = node[key]
        target = node if isinstance(node, dict | list) else parent
        if target is None:
            value = draw(NASTY_JSON)
            continue
        if isinstance(target, dict):
            step = draw(st.integers(0, 2))
            if step == 0 and target:
                del target[draw(st.sampled_from(list(target)))]
            elif step == 1:
                target[draw(st.text(max_size=12))] = draw(NASTY_JSON)
            else:
                name = draw(st.sampled_from(list(target))) if target else "type"
                target[name] = draw(NASTY_JSON)
        elif target:
            target[draw(st.integers(0, len(target) - 1))] = draw(NASTY_JSON)
        else:
            target.append(draw(NASTY_JSON))
    return json.dumps(value).encode()
