"""The registry<->node contract: what both sides import, and nothing else does.

docs/api.md is its text; this module is its code. Filled in by the structure change (DESIGN §2).
"""

from __future__ import annotations

API_PORT = 51821  # docs/api.md: next to WireGuard's customary 51820
