"""One stream of one source: reads its shards in cursor order through a shuffle buffer, resumable exactly."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from .cursor import StreamState, modality_of, order_seed, parse_key, planned_share, shard_key
from .storage_io import DataSourceError, RetryingReader, RetryPolicy, safe_url
from .samples import Prep, shard_items

_MASK64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64: a counter-based RNG, so the shuffle state is one integer in the cursor."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@dataclass
class StreamContext:
    """What every stream of a worker shares."""

    seed: int
    buffer_size: int
    prep: Prep
    retry: RetryPolicy
    block_bytes: int
    count: Callable[[str, int], None]   # count(counter, amount)


class SourceStream:
    """Items of one source for one (rank, worker), in an order fixed by its StreamState."""

    def __init__(self, source: str, shards: list[tuple[str, int]], state: StreamState, ctx: StreamContext):
        self.source, self.shards, self.st, self.ctx = source, shards, state, ctx
        self._rng_key = order_seed(ctx.seed, f"{source}/shuffle/{state.streams}", state.index)
        self._head_gen = self._head_iter = self._head_reader = None
        self._head_gave = False            # the head shard gave a usable sample
        self._items: list = []             # prepared items, parallel to state.buffer
        self._in_buffer = Counter(shard_key(e, s) for e, s, _ in state.buffer)
        self._usable_since_plan = False    # a shard gave a usable sample since the last plan
        self._empty_plans = -1             # consecutive plans without a usable sample (first plan: -1 -> 0)
        self._barren: dict[int, None] = {}  # shards that gave no usable sample since the last one (ordered)
        self._restored = False

    # -- reading ------------------------------------------------------------------------------------------
    def _open(self, shard: int, wanted: Callable[[int], bool], count_skips: bool = True):
        url = self.shards[shard][0]
        self.ctx.count("shards_opened", 1)
        reader = RetryingReader(url, self.ctx.retry, self.ctx.block_bytes,
                                on_bytes=lambda n: self.ctx.count("bytes_read", n),
                                on_retry=lambda: self.ctx.count("read_retries", 1))
        on_skip = (lambda name: self.ctx.count(name, 1)) if count_skips else (lambda name: None)
        return reader, shard_items(modality_of(self.source), url, reader, self.ctx.prep, on_skip, wanted,
                                   corpus=self.source)

    def _start_head(self, epoch: int, shard: int, pos: int, also: set[int]):
        done = self.st.done.setdefault(shard_key(epoch, shard), set())
        self.st.head = [epoch, shard, pos]
        self._head_gave = False
        reader, items = self._open(shard, lambda o: o in also or (o >= pos and o not in done))
        self._head_reader, self._head_gen, self._head_iter = reader, items, items

    def _close_head(self):
        if self._head_gen is not None:
            self._head_gen.close()
            self._head_reader.close()
        self._head_gen = self._head_iter = self._head_reader = None

    def _plan_epoch(self):
        if len(self._barren) == len(self.shards):
            raise self._no_readable_shard()
        self._empty_plans = 0 if self._usable_since_plan else self._empty_plans + 1
        if self._empty_plans >= 2:
            # This stream's own shares may just be the corpus's bad shards (few shards, many ranks): only the
            # corpus having no readable shard at all stops the run.
            self._probe_other_shards()
            self._empty_plans = 0
        self._usable_since_plan = False
        while not self.st.todo:  # fewer shards than streams: some epochs give this stream none (at most S/n)
            e = self.st.fresh_epoch
            self.st.todo = [[e, s] for s in planned_share(self.ctx.seed, self.source, e, len(self.shards),
                                                          self.st.streams, self.st.index)]
            self.st.fresh_epoch += 1

    def _probe_other_shards(self):
        """Find one shard of the corpus that gives a usable sample, among those this stream has not seen give
        none; raise when there is none. Each shard is read up to its first usable sample and at most once per
        run of barren shards, so an unreadable corpus stops after at most one look at every shard. Nothing
        read here is delivered or counted as skipped (the stream that owns the shard counts it)."""
        for shard in range(len(self.shards)):
            if shard not in self._barren:
                if self._gives_a_sample(shard):
                    return
                self._barren[shard] = None
        raise self._no_readable_shard()

    def _gives_a_sample(self, shard: int) -> bool:
        reader, items = self._open(shard, lambda o: True, count_skips=False)
        try:
            return next(items, None) is not None
        finally:
            items.close()
            reader.close()

    def _no_readable_shard(self) -> DataSourceError:
        bad = self.shards[next(iter(self._barren))][0]
        return DataSourceError(f"source {self.source}: no usable sample (no readable shard): none of its "
                               f"{len(self.shards)} shards gave one (e.g. {safe_url(bad)}); the warnings "
                               f"name each shard and why it was skipped (not_a_tar, truncated_shard, ...); "
                               f"replace or remove the bad shards")

    def _pull(self) -> tuple[list[int], dict]:
        """The next item of this stream's shard sequence that was not yielded before."""
        while True:
            if self._head_iter is not None:
                e, s, pos = self.st.head
                done = self.st.done[shard_key(e, s)]
                for ordinal, item in self._head_iter:
                    self.st.head[2] = ordinal + 1
                    self._saw_usable()  # also one delivered before a resume: the shard is readable
                    if item is None or ordinal < pos or ordinal in done:
                        continue
                    return [e, s, ordinal], item
                if not self._head_gave:
                    self._barren[s] = None
                self._close_head()
                self.st.head = None
                self._maybe_finished(shard_key(e, s))
            elif self.st.todo:
                e, s = self.st.todo.pop(0)
                self._start_head(e, s, 0, set())
            else:
                self._plan_epoch()

    def _saw_usable(self):
        self._head_gave = self._usable_since_plan = True
        self._barren.clear()

    def _maybe_finished(self, key: str):
        head = shard_key(*self.st.head[:2]) if self.st.head else None
        if key != head and self._in_buffer[key] == 0:
            self.st.done.pop(key, None)
            self._in_buffer.pop(key, None)

    # -- exact resume -------------------------------------------------------------------------------------
    def _restore(self):
        """Re-read the items the saved buffer held: from the head shard up to its position, and from the other
        shards that still had items in the buffer (only shards that were open at the save)."""
        need: dict[str, set[int]] = {}
        for e, s, o in self.st.buffer:
            need.setdefault(shard_key(e, s), set()).add(o)
        found: dict[tuple[str, int], dict] = {}
        head_key = shard_key(*self.st.head[:2]) if self.st.head else None
        for key, ordinals in need.items():
            if key != head_key:
                found.update(self._read_items(key, ordinals))
        if self.st.head:
            e, s, pos = self.st.head
            also = need.get(head_key, set())
            self._start_head(e, s, pos, also)
            if also:
                found.update(self._collect_head(head_key, also, pos))
        missing = [b for b in self.st.buffer if (shard_key(b[0], b[1]), b[2]) not in found]
        if missing:
            raise DataSourceError(f"source {self.source}: the cursor's buffer names items that the shards no "
                                  f"longer hold, e.g. shard {safe_url(self.shards[missing[0][1]][0])} "
                                  f"item {missing[0][2]}")
        self._items = [found[(shard_key(e, s), o)] for e, s, o in self.st.buffer]

    def _read_items(self, key: str, ordinals: set[int]) -> dict:
        _, s = parse_key(key)
        reader, items = self._open(s, lambda o: o in ordinals)
        out = {}
        try:
            for ordinal, item in items:
                if item is not None and ordinal in ordinals:
                    out[(key, ordinal)] = item
                    if len(out) == len(ordinals):
                        break  # the rest of the shard is not needed
        finally:
            items.close()
            reader.close()
        return out

    def _collect_head(self, key: str, ordinals: set[int], pos: int) -> dict:
        """Read the head shard up to ``pos``, keeping the buffered items; reading then continues from pos."""
        out = {}
        for ordinal, item in self._head_iter:
            self._saw_usable()
            if ordinal >= pos:  # read one too far: put it back in front of the iterator
                self._head_iter = itertools.chain([(ordinal, item)], self._head_iter)
                break
            if ordinal in ordinals and item is not None:
                out[(key, ordinal)] = item
        return out

    # -- drawing ------------------------------------------------------------------------------------------
    def take(self, n: int) -> tuple[list[list[int]], list[dict]]:
        """n items drawn from the shuffle buffer, refilled from the shards; refs are [epoch, shard,
        ordinal]."""
        if not self._restored:
            self._restore()
            self._restored = True
        refs, items = [], []
        for _ in range(n):
            while len(self.st.buffer) < self.ctx.buffer_size:
                ref, item = self._pull()
                self.st.buffer.append(ref)
                self._items.append(item)
                self._in_buffer[shard_key(ref[0], ref[1])] += 1
            j = _mix(self._rng_key ^ _mix(self.st.draws)) % len(self.st.buffer)
            self.st.draws += 1
            ref, item = self.st.buffer[j], self._items[j]
            self.st.buffer[j], self._items[j] = self.st.buffer[-1], self._items[-1]
            self.st.buffer.pop()
            self._items.pop()
            key = shard_key(ref[0], ref[1])
            self.st.done[key].add(ref[2])
            self._in_buffer[key] -= 1
            self._maybe_finished(key)
            refs.append(ref)
            items.append(item)
        return refs, items

    def snapshot(self) -> dict:
        return self.st.to_json()

    def close(self):
        self._close_head()
