"""A wg-quick(8) configuration file as text: `[Interface]` and `[Peer]` sections of `Key =
value` lines. Edits keep every other line as it was (comments, order, spacing), so that
`invite` and `revoke` change only the block they add or remove.

wgpunch's own facts live in comments that wg-quick ignores, `# wgpunch: key = value`: the
registry's public endpoint (in `[Interface]`) and an invited node's name (in its `[Peer]`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MARK = "# wgpunch:"
_HEADER = re.compile(r"^\s*\[(\w+)\]\s*$")


@dataclass(frozen=True, slots=True)
class Section:
    kind: str  # "Interface" or "Peer"
    lines: tuple[str, ...]  # the header line and everything up to the next header

    def values(self, key: str) -> list[str]:
        """Every value of `key` (case-insensitive, as wg-quick reads keys); comma-separated
        values (AllowedIPs, Address) are split."""
        found: list[str] = []
        for line in self.lines[1:]:
            name, sep, value = line.split("#", 1)[0].partition("=")
            if sep and name.strip().lower() == key.lower():
                found += [v.strip() for v in value.split(",") if v.strip()]
        return found

    def value(self, key: str) -> str | None:
        values = self.values(key)
        return values[0] if values else None

    def mark(self, key: str) -> str | None:
        """The value of wgpunch's comment `# wgpunch: key = value` in this section."""
        for line in self.lines[1:]:
            if line.strip().startswith(MARK):
                name, sep, value = line.strip()[len(MARK):].partition("=")
                if sep and name.strip() == key:
                    return value.strip()
        return None


@dataclass(frozen=True, slots=True)
class WgQuickConfig:
    preamble: tuple[str, ...]  # lines before the first section
    sections: tuple[Section, ...]

    @classmethod
    def parse(cls, text: str) -> WgQuickConfig:
        preamble: list[str] = []
        sections: list[Section] = []
        current: list[str] | None = None
        kind = ""
        for line in text.splitlines():
            header = _HEADER.match(line)
            if header:
                if current is not None:
                    sections.append(Section(kind, tuple(current)))
                kind, current = header.group(1), [line]
            elif current is None:
                preamble.append(line)
            else:
                current.append(line)
        if current is not None:
            sections.append(Section(kind, tuple(current)))
        return cls(tuple(preamble), tuple(sections))

    def text(self) -> str:
        lines = [*self.preamble, *(line for s in self.sections for line in s.lines)]
        return "\n".join(lines) + "\n" if lines else ""

    @property
    def interface(self) -> Section | None:
        return next((s for s in self.sections if s.kind.lower() == "interface"), None)

    @property
    def peers(self) -> tuple[Section, ...]:
        return tuple(s for s in self.sections if s.kind.lower() == "peer")

    def with_section(self, section: Section) -> WgQuickConfig:
        """The config with `section` appended, after one blank line."""
        sections = list(self.sections)
        if sections and sections[-1].lines[-1].strip():
            sections[-1] = Section(sections[-1].kind, (*sections[-1].lines, ""))
        return WgQuickConfig(self.preamble, (*sections, section))

    def without(self, section: Section) -> WgQuickConfig:
        return WgQuickConfig(self.preamble, tuple(s for s in self.sections if s is not section))


def section(kind: str, *lines: str) -> Section:
    return Section(kind, (f"[{kind}]", *lines))
