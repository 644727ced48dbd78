"""Log lines about what clients did: refused, timed out, rate-limited, malformed.

A hostile client can cause such a condition as often as it likes, so each kind is logged at
most once per client per period, and at most `lines_per_kind` times per period in all (a
client can use many source addresses); the next line says how many were held back. Never a
traceback: a client's input is not a bug of ours.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable

from ..throttle import Throttle


class ClientLog:
    def __init__(self, logger: logging.Logger, period_s: float, lines_per_kind: int, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._period_s = period_s
        self._lines_per_kind = lines_per_kind
        self._clock = clock
        self._throttles: dict[str, Throttle] = {}

    def log(self, client: Hashable, message: str, *args: object, event: str,
            level: int = logging.WARNING) -> bool:
        """Log `message % args` as `event` (the kind), unless held back; True if logged."""
        throttle = self._throttles.get(event)
        if throttle is None:
            throttle = self._throttles[event] = Throttle(self._period_s,
                                                         max_lines=self._lines_per_kind)
        held = throttle.allow(client, self._clock())
        if held is None:
            return False
        suffix = f" ({held} more like it not logged)" if held else ""
        self._logger.log(level, message + "%s", *args, suffix,
                         extra={"event": event, "source": str(client)})
        return True
