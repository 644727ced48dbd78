"""docs/events.md lists every event the source logs, and every event name is snake_case."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "wgpunch"
DOC = ROOT / "docs" / "events.md"

# `extra={"event": "name", ...}` in log calls (and the probe's docstring), `emit(event="name")`
# in the lab probe.
IN_SOURCE = re.compile(r"""["']event["']\s*:\s*["']([^"']+)["']|\bevent\s*=\s*["']([^"']+)["']""")
# A table row whose first cell is a name in backticks.
IN_DOC = re.compile(r"^\|\s*`([^`]+)`\s*\|", re.MULTILINE)
SNAKE_CASE = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)*")


def source_events() -> dict[str, list[str]]:
    """Event name -> where it is logged (path:line)."""
    found: dict[str, list[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for match in IN_SOURCE.finditer(line):
                name = match.group(1) or match.group(2)
                found.setdefault(name, []).append(f"{path.relative_to(ROOT)}:{number}")
    return found


def documented_events() -> set[str]:
    return set(IN_DOC.findall(DOC.read_text()))


def test_the_source_logs_events():
    """The pattern still finds them (an empty set would make the other tests pass vacuously)."""
    assert {"connected", "punch", "registry_connected", "forbidden"} <= set(source_events())


def test_every_event_in_the_source_is_documented():
    missing = {name: where for name, where in source_events().items()
               if name not in documented_events()}
    assert not missing, f"add these to docs/events.md: {missing}"


def test_every_documented_event_is_still_logged():
    stale = documented_events() - set(source_events())
    assert not stale, f"docs/events.md lists events the source no longer has: {sorted(stale)}"


def test_event_names_are_snake_case():
    names = set(source_events()) | documented_events()
    bad = sorted(name for name in names if not SNAKE_CASE.fullmatch(name))
    assert not bad, f"event names are snake_case: {bad}"
