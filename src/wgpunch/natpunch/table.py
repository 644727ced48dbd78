"""A bounded table whose entries expire: what a rendezvous server remembers.

The references keep every key they ever saw (natpunch-go: two Go maps, no limit, no expiry)
or scan all 65,536 slots per lookup (wireguard-tools). Here every operation is O(1)
amortised: entries sit in update order, so the expired ones and, when the table is full, the
least recently updated one are always at the front.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Table(Generic[K, V]):
    def __init__(self, capacity: int, ttl_s: float) -> None:
        if capacity < 1 or ttl_s <= 0:
            raise ValueError("a table needs a capacity of at least 1 and a positive TTL")
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self.evicted = 0  # pushed out while still fresh: the table is too small, or flooded

    def put(self, key: K, value: V, now: float) -> None:
        """Insert or refresh `key`; it becomes the newest entry."""
        self.expire(now)
        self._items[key] = (now, value)
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
            self.evicted += 1

    def get(self, key: K, now: float) -> V | None:
        """The value of `key` if it is in the table and fresh. Reading does not refresh."""
        self.expire(now)
        item = self._items.get(key)
        return None if item is None else item[1]

    def pop(self, key: K) -> V | None:
        item = self._items.pop(key, None)
        return None if item is None else item[1]

    def expire(self, now: float) -> None:
        while self._items:
            key, (updated, _) = next(iter(self._items.items()))
            if now - updated < self.ttl_s:
                return
            del self._items[key]

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[K]:
        return iter(self._items)
