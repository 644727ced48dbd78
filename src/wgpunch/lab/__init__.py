"""The NAT lab: a small internet in network namespaces (DESIGN.md §9).

`from wgpunch.lab import Lab, resolve`. The names are loaded on first use, so that the small
tools run inside namespaces (`python3 -m wgpunch.lab.probe`, `.wire`) start without loading
the rest.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Lab", "LabHost", "resolve"]


def __getattr__(name: str) -> Any:
    if name in ("Lab", "LabHost"):
        from . import lab

        return getattr(lab, name)
    if name == "resolve":
        from .catalog import resolve

        return resolve
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
