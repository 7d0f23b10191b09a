from __future__ import annotations

import copy
import gc
import sys
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from types import FrameType
from typing import Any

import pytest
from cachetools import Cache
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule

from daemon.cache import Key, Prefix, PrefixTTLCache


class FakeTimer:
    """Time that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def physical_keys(cache: PrefixTTLCache) -> list[Key]:
    """Every stored key, expired or not, without expiring or reordering anything."""
    return list(Cache.__iter__(cache))


def assert_index_exact(cache: PrefixTTLCache) -> None:
    grouped: dict[Prefix, set[Key]] = {}
    for key in physical_keys(cache):
        grouped.setdefault(key[: cache.prefix_len], set()).add(key)
    assert cache._index == grouped
    assert all(cache._index.values()), "an empty set was left in the index"


def make(maxsize: int = 10, ttl: float = 10.0) -> tuple[PrefixTTLCache, FakeTimer]:
    timer = FakeTimer()
    return PrefixTTLCache(maxsize, ttl, timer=timer), timer


# --- keys ------------------------------------------------------------------------------------------


def test_keys_must_be_tuples_at_least_as_long_as_the_prefix() -> None:
    cache, _ = make()
    with pytest.raises(TypeError):
        cache["conv-1"] = 1  # type: ignore[index]
    with pytest.raises(ValueError, match="shorter than the prefix"):
        cache[("conv",)] = 1
    with pytest.raises(ValueError, match="shorter than the prefix"):
        cache.store(("conv",), 1, cache.generation(("conv", "a")))
    cache[("conv", "a")] = 1  # a key may be the prefix itself
    assert cache._index == {("conv", "a"): {("conv", "a")}}
    assert_index_exact(cache)


def test_prefixes_must_have_exactly_prefix_len_elements() -> None:
    cache, _ = make()
    for bad in [("conv",), ("conv", "a", "page")]:
        with pytest.raises(ValueError, match="does not have 2 elements"):
            cache.evict_prefix(bad)
        with pytest.raises(ValueError, match="does not have 2 elements"):
            cache.generation(bad)
    with pytest.raises(TypeError):
        cache.evict_prefix("conv")  # type: ignore[arg-type]


def test_prefix_len_is_configurable() -> None:
    cache = PrefixTTLCache(10, 10.0, timer=FakeTimer(), prefix_len=1)
    cache[("a", 1)] = 1
    cache[("a", 2)] = 2
    cache[("b", 1)] = 3
    assert cache.evict_prefix(("a",)) == 2
    assert physical_keys(cache) == [("b", 1)]
    assert_index_exact(cache)
    with pytest.raises(ValueError, match="prefix_len"):
        PrefixTTLCache(10, 10.0, prefix_len=0)


# --- every path that adds or removes a key ---------------------------------------------------------


def test_set_and_overwrite_keep_one_index_entry() -> None:
    cache, _ = make()
    cache[("conv", "a", "p1")] = 1
    cache[("conv", "a", "p1")] = 2
    cache[("conv", "a", "p2")] = 3
    assert cache[("conv", "a", "p1")] == 2
    assert cache._index == {("conv", "a"): {("conv", "a", "p1"), ("conv", "a", "p2")}}
    assert_index_exact(cache)


def test_del_unindexes_and_drops_the_empty_set() -> None:
    cache, _ = make()
    cache[("conv", "a", 1)] = 1
    cache[("conv", "b", 1)] = 2
    del cache[("conv", "a", 1)]
    assert cache._index == {("conv", "b"): {("conv", "b", 1)}}
    with pytest.raises(KeyError):
        del cache[("conv", "a", 1)]
    with pytest.raises(KeyError):
        del cache["not a tuple"]  # type: ignore[arg-type]
    assert_index_exact(cache)


def test_del_of_an_expired_key_raises_but_still_unindexes() -> None:
    cache, timer = make(ttl=10)
    cache[("conv", "a", 1)] = 1
    timer.now = 10.0  # expired, still stored: nothing has called expire() yet
    assert physical_keys(cache) == [("conv", "a", 1)]
    with pytest.raises(KeyError):
        del cache[("conv", "a", 1)]  # TTLCache deletes it, then raises
    assert physical_keys(cache) == []
    assert cache._index == {}


def test_pop() -> None:
    cache, timer = make(ttl=10)
    cache[("conv", "a", 1)] = "one"
    cache[("conv", "a", 2)] = "two"
    assert cache.pop(("conv", "a", 1)) == "one"
    assert cache.pop(("conv", "a", 1), None) is None
    with pytest.raises(KeyError):
        cache.pop(("conv", "a", 1))
    assert_index_exact(cache)
    timer.now = 10.0
    # An expired key pops as missing and stays stored (and indexed) until something expires it.
    assert cache.pop(("conv", "a", 2), "gone") == "gone"
    assert cache._index == {("conv", "a"): {("conv", "a", 2)}}
    assert_index_exact(cache)


def test_popitem_removes_the_least_recently_used() -> None:
    cache, _ = make()
    cache[("conv", "a", 1)] = 1
    cache[("conv", "b", 1)] = 2
    assert cache.popitem() == (("conv", "a", 1), 1)
    assert cache._index == {("conv", "b"): {("conv", "b", 1)}}
    cache.popitem()
    assert cache._index == {}
    with pytest.raises(KeyError):
        cache.popitem()


def test_lru_eviction_when_full_unindexes_the_evicted_key() -> None:
    cache, _ = make(maxsize=3)
    cache[("conv", "a", 1)] = 1
    cache[("conv", "b", 1)] = 2
    cache[("conv", "b", 2)] = 3
    assert cache.get(("conv", "a", 1)) == 1  # now ("conv", "b", 1) is the least recently used
    cache[("conv", "c", 1)] = 4
    assert set(physical_keys(cache)) == {("conv", "a", 1), ("conv", "b", 2), ("conv", "c", 1)}
    assert_index_exact(cache)
    cache[("conv", "c", 2)] = 5  # evicts ("conv", "b", 2), the last key of "b"
    assert ("conv", "b") not in cache._index
    assert_index_exact(cache)


def test_expiry_unindexes_on_set_len_and_explicit_expire() -> None:
    cache, timer = make(ttl=10)
    cache[("conv", "a", 1)] = 1
    timer.now = 5.0
    cache[("conv", "b", 1)] = 2
    timer.now = 10.0  # ("conv", "a", 1) expires now: TTLCache treats expires <= now as expired
    assert ("conv", "a", 1) not in cache
    assert cache.get(("conv", "a", 1)) is None
    assert cache._index.keys() == {("conv", "a"), ("conv", "b")}  # nothing has called expire() yet
    cache[("conv", "c", 1)] = 3  # __setitem__ expires first
    assert cache._index.keys() == {("conv", "b"), ("conv", "c")}
    assert_index_exact(cache)

    timer.now = 15.0
    assert len(cache) == 1  # __len__ expires too
    assert_index_exact(cache)

    timer.now = 20.0
    assert cache.expire() == [(("conv", "c", 1), 3)]
    assert cache._index == {}


def test_setting_an_expired_key_again_keeps_it_indexed() -> None:
    cache, timer = make(ttl=10)
    cache[("conv", "a", 1)] = 1
    timer.now = 10.0
    cache[("conv", "a", 1)] = 2  # expire() unindexes the old item, then the new one is indexed
    assert cache._index == {("conv", "a"): {("conv", "a", 1)}}
    assert cache[("conv", "a", 1)] == 2


def test_clear() -> None:
    cache, _ = make()
    for i in range(5):
        cache[("conv", str(i), "record")] = i
    cache.clear()
    assert physical_keys(cache) == []
    assert cache._index == {}
    cache[("conv", "0", "record")] = 0
    assert_index_exact(cache)


def test_a_copy_has_its_own_index() -> None:
    cache, _ = make()
    cache[("conv", "a", 1)] = 1
    twin = copy.copy(cache)
    twin[("conv", "b", 1)] = 2
    del twin[("conv", "a", 1)]
    assert cache._index == {("conv", "a"): {("conv", "a", 1)}}
    assert_index_exact(cache)
    assert_index_exact(twin)


def test_a_value_too_large_stores_and_indexes_nothing() -> None:
    cache = PrefixTTLCache(0, 10.0, timer=FakeTimer())
    with pytest.raises(ValueError, match="too large"):
        cache[("conv", "a", 1)] = 1
    assert cache._index == {}


# --- evict_prefix and the counters -----------------------------------------------------------------


def test_evict_prefix_removes_exactly_that_conversation() -> None:
    cache, _ = make()
    for page in range(3):
        cache[("conv", "a", "page", page)] = page
        cache[("conv", "ab", "page", page)] = page  # a longer id is not under ("conv", "a")
    cache[("conv", "a")] = "record"
    assert cache.evict_prefix(("conv", "a")) == 4
    assert {key[1] for key in physical_keys(cache)} == {"ab"}
    assert cache.evictions == 4
    assert cache.evict_prefix(("conv", "a")) == 0
    assert cache.evict_prefix(("conv", "never")) == 0
    assert cache.evictions == 4
    assert_index_exact(cache)


def test_evict_prefix_removes_expired_keys_without_counting_them() -> None:
    cache, timer = make(ttl=10)
    cache[("conv", "a", 1)] = 1
    timer.now = 5.0
    cache[("conv", "a", 2)] = 2
    timer.now = 12.0  # ("conv", "a", 1) has expired but is still stored
    assert cache.evict_prefix(("conv", "a")) == 1
    assert physical_keys(cache) == []
    assert cache._index == {}
    assert cache.evictions == 1


def test_get_counts_hits_and_misses() -> None:
    cache, timer = make(ttl=10)
    cache[("conv", "a", 1)] = "x"
    assert cache.get(("conv", "a", 1)) == "x"
    assert cache.get(("conv", "a", 2)) is None
    assert cache.get(("conv", "a", 2), "dflt") == "dflt"
    timer.now = 10.0
    assert cache.get(("conv", "a", 1)) is None  # expired: a miss
    assert (cache.hits, cache.misses) == (1, 3)
    cache[("conv", "a", 3)] = None  # a stored None is a hit
    assert cache.get(("conv", "a", 3), "dflt") is None
    assert (cache.hits, cache.misses) == (2, 3)


# --- read-your-writes: generation() and store() ----------------------------------------------------


def test_store_without_an_eviction_in_between_stores() -> None:
    cache, _ = make()
    generation = cache.generation(("conv", "a"))
    assert cache.store(("conv", "a", "record"), "v1", generation)
    assert cache[("conv", "a", "record")] == "v1"
    assert_index_exact(cache)


def test_reader_evict_store_interleaving_does_not_store_the_stale_read() -> None:
    cache, _ = make()
    database = {"a": "old"}
    # Reader: generation first, then the database (it sees the old snapshot).
    generation = cache.generation(("conv", "a"))
    snapshot = database["a"]
    # Writer: commits, then evicts the conversation. Nothing was cached yet: it must count anyway.
    database["a"] = "new"
    assert cache.evict_prefix(("conv", "a")) == 0
    # Reader: stores its now-stale result; it must be refused, else it would live until the TTL.
    assert not cache.store(("conv", "a", "record"), snapshot, generation)
    assert ("conv", "a", "record") not in cache
    assert cache._index == {}
    # The next reader starts after the eviction, reads the new data, and may store it.
    generation = cache.generation(("conv", "a"))
    assert cache.store(("conv", "a", "record"), database["a"], generation)
    assert cache[("conv", "a", "record")] == "new"


def test_evicting_another_conversation_does_not_refuse_a_store() -> None:
    cache, _ = make()
    generation = cache.generation(("conv", "a"))
    cache.evict_prefix(("conv", "b"))
    assert cache.store(("conv", "a", "record"), "v", generation)
    assert not cache.store(("conv", "b", "record"), "v", generation)


def test_clear_refuses_stores_read_before_it() -> None:
    cache, _ = make()
    generation = cache.generation(("conv", "a"))
    cache.clear()
    assert not cache.store(("conv", "a", "record"), "v", generation)
    assert cache.store(("conv", "a", "record"), "v", cache.generation(("conv", "a")))


def test_generation_bookkeeping_is_bounded_and_only_errs_on_refusing() -> None:
    cache = PrefixTTLCache(10, 10.0, timer=FakeTimer(), generation_slots=2)
    old = cache.generation(("conv", "a"))
    for name in ["a", "b", "c"]:  # "a" is the oldest entry and is dropped
        cache.evict_prefix(("conv", name))
    assert len(cache._evicted) == 2
    # "a" was evicted after `old` was read: with its entry gone it must still be refused.
    assert not cache.store(("conv", "a", 1), "stale", old)
    # "d" was never evicted: refusing is a false alarm (one more database read later), never a stale hit.
    assert not cache.store(("conv", "d", 1), "fresh", old)
    assert cache.store(("conv", "d", 1), "fresh", cache.generation(("conv", "d")))

    for i in range(1000):
        cache.evict_prefix(("conv", i))
    assert len(cache._evicted) == 2


def test_generation_bookkeeping_stays_bounded_by_default() -> None:
    cache, _ = make()
    for i in range(20_000):
        cache.evict_prefix(("conv", i))
    assert len(cache._evicted) == 4096


# --- the index against a model, under random operations --------------------------------------------

MAXSIZE = 5
TTL = 10
conv_ids = st.integers(0, 3)
keys = st.builds(
    lambda cid, rest: ("conv", cid, *rest),
    conv_ids,
    st.sampled_from([(), ("record",), ("page", 0), ("page", 1)]),
)
prefixes = st.builds(lambda cid: ("conv", cid), conv_ids)


@dataclass(frozen=True)
class Token:
    prefix: Prefix
    generation: int
    evictions_seen: int  # the model's count of evictions of this prefix (and clears) when read


class PrefixCacheMachine(RuleBasedStateMachine):
    """Random operations on a small cache, checked against a model of TTLCache's semantics.

    The model is an LRU-ordered dict of ``key -> (value, expires)``. Only live (unexpired) items are
    compared: which expired items are still physically stored depends on when cachetools happens to
    call expire(), but the live ones, and which of them LRU eviction picks, are fully determined.
    """

    tokens = Bundle("tokens")

    @initialize()
    def start(self) -> None:
        self.timer = FakeTimer()
        self.cache = PrefixTTLCache(MAXSIZE, TTL, timer=self.timer)
        self.model: OrderedDict[Key, tuple[int, float]] = OrderedDict()
        self.invalidations: dict[Prefix, int] = {}  # evict_prefix() and clear() per prefix, for tokens
        self.hits = self.misses = 0

    def live(self, key: Key) -> bool:
        entry = self.model.get(key)
        return entry is not None and self.timer.now < entry[1]

    def model_set(self, key: Key, value: int) -> None:
        now = self.timer.now
        for expired in [k for k, (_, expires) in self.model.items() if not now < expires]:
            del self.model[expired]
        if key not in self.model and len(self.model) >= MAXSIZE:
            self.model.popitem(last=False)
        self.model[key] = (value, now + TTL)
        self.model.move_to_end(key)

    @rule(items=st.lists(st.tuples(keys, st.integers()), min_size=1, max_size=4))
    def set(self, items: list[tuple[Key, int]]) -> None:
        for key, value in items:  # several at a time, so that the cache fills up and LRU eviction happens
            self.cache[key] = value
            self.model_set(key, value)

    @rule(key=keys)
    def get(self, key: Key) -> None:
        got = self.cache.get(key, "missing")
        if self.live(key):
            self.model.move_to_end(key)
            assert got == self.model[key][0]
            self.hits += 1
        else:
            assert got == "missing"
            self.misses += 1
        assert (self.cache.hits, self.cache.misses) == (self.hits, self.misses)

    @rule(key=keys)
    def delete(self, key: Key) -> None:
        was_live = self.live(key)
        self.model.pop(key, None)
        try:
            del self.cache[key]
        except KeyError:
            assert not was_live
        else:
            assert was_live

    @rule(key=keys)
    def pop(self, key: Key) -> None:
        got = self.cache.pop(key, "missing")
        if self.live(key):
            assert got == self.model.pop(key)[0]
        else:
            assert got == "missing"

    @rule(prefix=prefixes)
    def evict_prefix(self, prefix: Prefix) -> None:
        expected = {k for k in self.model if k[:2] == prefix and self.live(k)}
        live_before = set(self.cache)
        assert self.cache.evict_prefix(prefix) == len(expected)
        assert live_before - set(self.cache) == expected
        assert not any(k[:2] == prefix for k in physical_keys(self.cache))
        for key in [k for k in self.model if k[:2] == prefix]:
            del self.model[key]
        self.invalidations[prefix] = self.invalidations.get(prefix, 0) + 1

    @rule()
    def clear(self) -> None:
        self.cache.clear()
        self.model.clear()
        for cid in range(4):
            self.invalidations[("conv", cid)] = self.invalidations.get(("conv", cid), 0) + 1

    @rule(seconds=st.integers(1, TTL))
    def advance(self, seconds: int) -> None:
        self.timer.now += seconds

    @rule()
    def expire_the_oldest(self) -> None:
        # Exactly to the first expiry time (an item expires when now == expires), so that the cache
        # often holds expired and live items together.
        pending = [expires for _, expires in self.model.values() if self.timer.now < expires]
        if pending:
            self.timer.now = min(pending)

    @rule(target=tokens, prefix=prefixes)
    def read_generation(self, prefix: Prefix) -> Token:
        return Token(prefix, self.cache.generation(prefix), self.invalidations.get(prefix, 0))

    @rule(token=tokens, rest=st.sampled_from([(), ("record",), ("page", 0)]), value=st.integers())
    def store(self, token: Token, rest: tuple[Hashable, ...], value: int) -> None:
        key = (*token.prefix, *rest)
        stale = self.invalidations.get(token.prefix, 0) != token.evictions_seen
        stored = self.cache.store(key, value, token.generation)
        # With the default generation_slots nothing is dropped here, so fresh stores always succeed.
        assert stored == (not stale)
        if stored:
            self.model_set(key, value)

    @invariant()
    def index_is_exact(self) -> None:
        assert_index_exact(self.cache)

    @invariant()
    def live_items_agree_with_the_model(self) -> None:
        live = {key: Cache.__getitem__(self.cache, key) for key in self.cache}  # no reordering
        assert live == {key: value for key, (value, _) in self.model.items() if self.live(key)}


PrefixCacheMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)
test_prefix_cache_machine = PrefixCacheMachine.TestCase


# --- eviction work is proportional to the prefix's keys, not to the cache ---------------------------


class Touches:
    def __init__(self) -> None:
        self.count = 0


class Counted:
    """A key element that counts every hash and comparison of the keys it is part of."""

    __slots__ = ("n", "touches")

    def __init__(self, n: int, touches: Touches) -> None:
        self.n = n
        self.touches = touches

    def __hash__(self) -> int:
        self.touches.count += 1
        return hash(self.n)

    def __eq__(self, other: object) -> bool:
        self.touches.count += 1
        return isinstance(other, Counted) and other.n == self.n


@dataclass(frozen=True)
class Work:
    removed: int
    other_touches: int  # hashes and comparisons of the other conversations' keys
    target_touches: int  # hashes and comparisons of the evicted conversation's keys
    traced_events: int  # Python calls and lines executed (cachetools' and ours)


def count_traced_events(action: Callable[[], Any]) -> tuple[Any, int]:
    events = 0

    def tracer(frame: FrameType, event: str, arg: Any) -> Callable[..., Any]:
        nonlocal events
        events += 1
        return tracer

    previous = sys.gettrace()
    gc.disable()  # a collection could run unrelated finalizers inside the measurement
    sys.settrace(tracer)
    try:
        result = action()
    finally:
        sys.settrace(previous)
        gc.enable()
    return result, events


def eviction_work(others: int) -> Work:
    other_touches, target_touches = Touches(), Touches()
    cache = PrefixTTLCache(others + 20, 60.0, timer=FakeTimer())
    other_keys = [("conv", Counted(i // 5, other_touches), "page", i % 5) for i in range(others)]
    for key in other_keys[: others // 2]:
        cache[key] = "x"
    for page in range(20):
        cache[("conv", "target", "page", Counted(page, target_touches))] = "x"
    for key in other_keys[others // 2 :]:
        cache[key] = "x"
    other_touches.count = target_touches.count = 0

    removed, events = count_traced_events(lambda: cache.evict_prefix(("conv", "target")))

    assert len(physical_keys(cache)) == others
    return Work(removed, other_touches.count, target_touches.count, events)


def test_evict_prefix_touches_only_the_keys_under_the_prefix() -> None:
    small, large = eviction_work(100), eviction_work(100_000)
    assert small.removed == large.removed == 20
    assert small.other_touches == large.other_touches == 0
    assert small.target_touches > 0  # the probe does see the work done on the evicted keys...
    assert small.target_touches == large.target_touches  # ...and it does not grow with the cache
    assert small.traced_events == large.traced_events
