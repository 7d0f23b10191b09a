"""An in-process TTL cache of API reads that evicts one conversation's keys in O(its keys).

Keys are tuples whose first ``prefix_len`` elements name what they belong to, e.g.
``("conv", conversation_id, "record")``. The writer calls :meth:`PrefixTTLCache.evict_prefix` with
``("conv", conversation_id)`` after each commit; readers use :meth:`~PrefixTTLCache.generation` and
:meth:`~PrefixTTLCache.store` so that a result read before a commit is not stored after its eviction.

Not thread-safe (neither is cachetools): use it from the event loop's thread only.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, Final

from cachetools import Cache, TTLCache

Key = tuple[Hashable, ...]
Prefix = tuple[Hashable, ...]

if TYPE_CHECKING:
    _Base = TTLCache[Key, Any]
else:
    _Base = TTLCache  # cachetools' classes are not subscriptable at runtime

_MISSING: Final = object()


class PrefixTTLCache(_Base):
    """A ``TTLCache`` (LRU when full, per-item TTL) with an exact ``prefix -> keys`` index.

    Values are of any type: one cache holds message pages and conversation records alike.
    """

    def __init__(
        self,
        maxsize: int,
        ttl: float,
        *,
        timer: Callable[[], float] = time.monotonic,
        prefix_len: int = 2,
        generation_slots: int = 4096,
    ) -> None:
        if prefix_len < 1:
            raise ValueError("prefix_len must be at least 1")
        if generation_slots < 1:
            raise ValueError("generation_slots must be at least 1")
        super().__init__(maxsize, ttl, timer)
        self.prefix_len: Final = prefix_len
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        # Exactly the keys physically stored (expired or not), grouped by prefix; never an empty set.
        self._index: dict[Prefix, set[Key]] = {}
        # Generations. ``_clock`` ticks on every evict_prefix() and clear(). ``_evicted`` maps a prefix
        # to the tick of its last eviction, oldest first, and holds at most ``generation_slots`` prefixes.
        # When the oldest entry is dropped, ``_floor`` rises to its tick, so ``_floor`` is at least the
        # tick of every eviction that is no longer in the map. store() takes a missing entry to mean
        # "evicted at _floor": that can only be later than the truth, so a dropped entry can make
        # store() refuse a fresh value (a later miss reads the database again) but never accept a
        # stale one. This holds however long a read takes, so the map needs no time-based expiry.
        self._clock = 0
        self._floor = 0
        self._evicted: OrderedDict[Prefix, int] = OrderedDict()
        self._generation_slots = generation_slots

    # --- keys and the index --------------------------------------------------------------------

    def prefix_of(self, key: Key) -> Prefix:
        """The prefix of ``key``; TypeError if it is not a tuple, ValueError if it is too short."""
        if not isinstance(key, tuple):
            raise TypeError(f"cache keys are tuples, not {type(key).__name__}")
        if len(key) < self.prefix_len:
            raise ValueError(f"cache key {key!r} is shorter than the prefix ({self.prefix_len} elements)")
        return key[: self.prefix_len]

    def _check_prefix(self, prefix: Prefix) -> None:
        if not isinstance(prefix, tuple):
            raise TypeError(f"a prefix is a tuple, not {type(prefix).__name__}")
        if len(prefix) != self.prefix_len:
            raise ValueError(f"prefix {prefix!r} does not have {self.prefix_len} elements")

    def _unindex(self, key: Key) -> None:
        prefix = key[: self.prefix_len]
        keys = self._index.get(prefix)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._index[prefix]

    def __setitem__(self, key: Key, value: Any) -> None:
        prefix = self.prefix_of(key)
        # Indexed only once stored: the store may expire or LRU-evict (and unindex) other keys, or this
        # very key if it had expired, and it may raise without storing anything.
        super().__setitem__(key, value)
        keys = self._index.get(prefix)
        if keys is None:
            self._index[prefix] = {key}
        else:
            keys.add(key)

    def __delitem__(self, key: Key) -> None:
        # TTLCache.__delitem__ removes an expired item and then raises KeyError, and the LRU eviction
        # (popitem) comes through here too: unindex whenever the key is physically gone afterwards.
        present = Cache.__contains__(self, key)
        try:
            super().__delitem__(key)
        finally:
            if present and not Cache.__contains__(self, key):
                self._unindex(key)

    def expire(self, time: float | None = None) -> list[tuple[Key, Any]]:
        """Remove the expired items (and their index entries); returns them as ``(key, value)`` pairs."""
        # TTLCache.expire deletes through Cache.__delitem__, bypassing our __delitem__.
        expired = super().expire(time)
        for key, _ in expired:
            self._unindex(key)
        return expired

    def clear(self) -> None:
        """Empty the cache; a value read before this is refused by store()."""
        super().clear()
        self._index.clear()
        self._clock += 1
        self._floor = self._clock
        self._evicted.clear()

    def __copy__(self) -> PrefixTTLCache:
        # Cache.__copy__ shares the instance __dict__, which would share the index with the copy.
        copy: PrefixTTLCache = super().__copy__()  # type: ignore[misc]  # the stubs omit __copy__
        copy._index = {prefix: set(keys) for prefix, keys in self._index.items()}
        copy._evicted = self._evicted.copy()
        return copy

    # --- reads and targeted eviction -----------------------------------------------------------

    def get(self, key: Key, default: Any = None) -> Any:
        """The live value for ``key`` or ``default``; counts a hit or a miss."""
        value = super().get(key, _MISSING)
        if value is _MISSING:
            self.misses += 1
            return default
        self.hits += 1
        return value

    def evict_prefix(self, prefix: Prefix) -> int:
        """Delete every key under ``prefix``; returns how many live (unexpired) items that removed.

        Also advances the prefix's generation, even if nothing was cached: the point is to refuse a
        value being read right now.
        """
        self._check_prefix(prefix)
        removed = 0
        # A snapshot, as each deletion unindexes its key; the index stays exact if one raises.
        for key in list(self._index.get(prefix, ())):
            try:
                del self[key]
            except KeyError:  # it had expired: gone now, but it was no longer a live item
                continue
            removed += 1
        self.evictions += removed
        self._clock += 1
        self._evicted[prefix] = self._clock
        self._evicted.move_to_end(prefix)
        while len(self._evicted) > self._generation_slots:
            _, tick = self._evicted.popitem(last=False)
            self._floor = tick
        return removed

    # --- read-your-writes ------------------------------------------------------------------------

    def generation(self, prefix: Prefix) -> int:
        """A token to read before reading the database, for a later :meth:`store` under ``prefix``."""
        self._check_prefix(prefix)
        return self._clock

    def store(self, key: Key, value: Any, generation: int) -> bool:
        """Store ``value`` unless ``key``'s prefix was evicted (or the cache cleared) since ``generation``.

        Returns whether it stored the value.
        """
        prefix = self.prefix_of(key)
        if generation < max(self._floor, self._evicted.get(prefix, 0)):
            return False
        self[key] = value
        return True
