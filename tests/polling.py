"""Waiting for a condition in a test: poll it with a deadline, never sleep a fixed time."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def poll(check: Callable[[], T | Awaitable[T]], *, within_s: float = 5.0, what: str,
               alive: Callable[[], None] = lambda: None) -> T:
    """The first true value of `check()` (awaited if need be), polled for `within_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while True:
        alive()
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {within_s:.1f} s waiting for {what}")
        await asyncio.sleep(0.01)  # poll interval, bounded by the deadline above
