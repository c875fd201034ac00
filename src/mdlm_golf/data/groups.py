"""Groups of shards: which shards form each group of each epoch (GroupSchedule), and the buffer of one or two
halves they are read into, the next group ahead in a thread (GroupBuffer)."""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .rows import RowLayout
from .shards import read_shard

Key = tuple[int, int]  # (epoch, group)


@dataclass
class GroupIndex:
    """One loaded group: which shards, how many tokens, and its rows in serving order."""

    key: Key
    shards: tuple[int, ...]  # shard indices, in file order = their order in the buffer
    tokens: int
    starts: np.ndarray  # row starts in the buffer half, already in serving order
    lengths: np.ndarray  # row lengths (< seq_len only for the end of a document/segment)
    load_s: float  # seconds spent reading the shards and indexing
    read: bool  # False when the shards were already in the buffer (only the index was rebuilt)

    @property
    def num_rows(self) -> int:
        return int(self.starts.size)


class _Cancelled(Exception):
    """A prefetch stopped by drain (load_state_dict/close)."""


class GroupSchedule:
    """Each epoch shuffles the shard list with a seed derived from (seed, epoch) and cuts it into groups
    of `shards_per_group` (the last group of an epoch may be smaller), so every shard is visited exactly
    once per epoch before any repeats, and the order differs from epoch to epoch. A group lists its
    shards in file order: that is how they are laid out in the buffer."""

    def __init__(self, num_shards: int, shards_per_group: int, seed: int):
        self.num_shards, self.shards_per_group, self.seed = num_shards, shards_per_group, seed
        self.num_groups = -(-num_shards // shards_per_group)
        self._cache: dict[int, list[tuple[int, ...]]] = {}

    def rng_seed(self, epoch: int) -> list[int]:
        """Seed of the epoch's shard order."""
        return [self.seed, 0, epoch]

    def epoch_groups(self, epoch: int) -> list[tuple[int, ...]]:
        """The shard indices of every group of an epoch, in visiting order (cached: this epoch and the last)."""
        if epoch not in self._cache:
            order = np.random.default_rng(self.rng_seed(epoch)).permutation(self.num_shards)
            n = self.shards_per_group
            self._cache = {k: v for k, v in self._cache.items() if k >= epoch - 1}
            self._cache[epoch] = [tuple(sorted(int(i) for i in order[a:a + n]))
                                  for a in range(0, order.size, n)]
        return self._cache[epoch]

    def shards(self, key: Key) -> tuple[int, ...]:
        """The shards of group (epoch, group)."""
        return self.epoch_groups(key[0])[key[1]]

    def next_key(self, key: Key) -> Key:
        """The group after (epoch, group): the next of the epoch, else the first of the next epoch."""
        epoch, group = key
        return (epoch, group + 1) if group + 1 < self.num_groups else (epoch + 1, 0)


def group_capacity(counts: list[int], shards_per_group: int) -> int:
    """Tokens of the largest possible group: the sum of the shards_per_group largest shards."""
    return sum(sorted(counts, reverse=True)[:shards_per_group])


def file_runs(shards: tuple[int, ...], counts: list[int]) -> list[tuple[int, int]]:
    """[start, end) buffer runs of file-consecutive shards, for shards laid out back to back."""
    ends = np.cumsum([counts[s] for s in shards]).tolist()
    runs: list[tuple[int, int]] = []
    for j, (s, end) in enumerate(zip(shards, ends)):  # a loop over a group's few shards
        if j and s == shards[j - 1] + 1:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((ends[j - 1] if j else 0, end))
    return runs


class GroupBuffer:
    """Groups of shards read into one uint16 allocation, made once and reused for the whole run.

    Each half holds the largest possible group (group_capacity). With two halves, the group being
    served sits in one while a background thread reads the next group straight into the other with
    read_shard(out=...); at a rotation the halves swap roles. So with prefetch the resident data is
    2 x (shards_per_group shards), e.g. 800 MB for two 100M-token shards per group; with one half a
    group change loads synchronously. `buffer` is the real allocation: compare peak RSS against it
    (bench/loader.py does; measured peak RSS over baseline / buffer bytes: 1.056 with 100M-token
    shards, 1.08 with 25M, and a fixed ~5 MB of code pages, thread and temporaries that dominates
    with tiny shards). Outside the buffer live the row index of the two groups (int32 starts and
    lengths, ~5 MB for a 200M-token group of short documents at seq_len 2048) and each batch
    copied out. Pages of a half are first touched by its first load, which is therefore slower
    than later ones (page faults): the first rotation can wait a little.
    """

    def __init__(self, paths: list[Path], counts: list[int], capacity: int, halves: int,
                 vocab_size: int, rows: RowLayout):
        self.paths, self.counts, self.vocab_size, self.rows = paths, counts, vocab_size, rows
        self.buffer = np.empty(max(1, capacity) * halves, dtype=np.uint16)
        self.halves = [self.buffer[i * capacity:(i + 1) * capacity] for i in range(halves)]
        self.current: int | None = None  # the half being served
        self._loaded: list[GroupIndex | None] = [None] * halves
        self._pending: list[tuple[Key, Future] | None] = [None] * halves
        self._cancel = threading.Event()
        self._executor: ThreadPoolExecutor | None = None

    def verify(self) -> None:
        """Read every shard once (into the first half), so a bad token fails now rather than mid-run."""
        for path, count in zip(self.paths, self.counts):
            read_shard(path, self.vocab_size, out=self.halves[0][:count])

    def current_group(self, key: Key) -> GroupIndex | None:
        """The group being served, if it is `key` and fully loaded."""
        if self.current is None or self._pending[self.current] is not None:
            return None
        group = self._loaded[self.current]
        return group if group is not None and group.key == key else None

    def acquire(self, key: Key, shards: tuple[int, ...]) -> tuple[GroupIndex, bool]:
        """Serve group `key` next: its prefetch if one is in flight, else a load now; (group, prefetched)."""
        half = next((i for i, p in enumerate(self._pending) if p is not None and p[0] == key), None)
        prefetched = half is not None
        if prefetched:
            future = self._pending[half][1]
            try:
                group = future.result()  # a DataError of the prefetch thread surfaces here
            finally:
                self._pending[half] = None
        else:
            self.drain()
            half = self._half_for(shards)
            group = self._load(half, key, shards)
        self.current = half
        return group, prefetched

    def prefetch(self, key: Key, shards: tuple[int, ...]) -> None:
        """Start reading group `key` into the half not being served, in the background thread."""
        half = 1 - self.current
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-prefetch")
        self._pending[half] = (key, self._executor.submit(self._load, half, key, shards))

    def tokens(self, group: GroupIndex) -> np.ndarray:
        """The served group's tokens (its rows' starts index into this)."""
        return self.halves[self.current][:group.tokens]

    def _half_for(self, shards: tuple[int, ...]) -> int:
        """A half that already holds these shards (only the index is rebuilt), else the one not served."""
        reusable = [i for i, g in enumerate(self._loaded) if g is not None and g.shards == shards]
        if reusable:
            return reusable[0]
        return 0 if len(self.halves) == 1 or self.current is None else 1 - self.current

    def _load(self, half: int, key: Key, shards: tuple[int, ...]) -> GroupIndex:
        """Read a group's shards into one half, in file order, and index its rows (any thread)."""
        began = time.perf_counter()
        view = self.halves[half]
        old = self._loaded[half]
        self._loaded[half] = None
        reuse = old is not None and old.shards == shards
        offset = 0
        for s in shards:
            if self._cancel.is_set():
                raise _Cancelled()
            count = self.counts[s]
            if not reuse:
                read_shard(self.paths[s], self.vocab_size, out=view[offset:offset + count])
            offset += count
        starts, lengths = self.rows.index(view, file_runs(shards, self.counts), key)
        group = GroupIndex(key, shards, offset, starts, lengths, time.perf_counter() - began, not reuse)
        self._loaded[half] = group
        return group

    def drain(self) -> None:
        """Stop and forget any load in flight."""
        self._cancel.set()
        for i, pending in enumerate(self._pending):
            if pending is not None:
                try:
                    pending[1].result()
                except BaseException:  # noqa: BLE001 - a cancelled or failed prefetch is dropped
                    self._loaded[i] = None
                self._pending[i] = None
        self._cancel.clear()

    def reset(self) -> None:
        """Drain, and serve nothing: the next acquire loads (or reuses) its group."""
        self.drain()
        self.current = None

    def close(self) -> None:
        """Drain and stop the prefetch thread."""
        self.drain()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
