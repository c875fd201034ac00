"""Training batches from a shard set too large for memory: a few shards at a time, loaded ahead."""
from __future__ import annotations

import glob
import hashlib
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..config import LAYOUTS
from .shards import DataError, copy_rows, doc_windows, read_shard, read_shard_header

STATE_VERSION = 1


@dataclass
class GroupIndex:
    """One loaded group: which shards, where they sit, and its rows in serving order."""

    key: tuple[int, int]  # (epoch, group)
    shards: tuple[int, ...]  # shard indices, in file order = their order in the buffer
    tokens: int
    segments: list[tuple[int, int]]  # [start, end) buffer runs of file-consecutive shards
    starts: np.ndarray  # row starts in the buffer half, already in serving order
    lengths: np.ndarray  # row lengths (< seq_len only for the end of a document/segment)
    load_s: float  # seconds spent reading the shards and indexing
    read: bool  # False when the shards were already in the buffer (only the index was rebuilt)

    @property
    def num_rows(self) -> int:
        return int(self.starts.size)


def _stream_rows(n: int, base: int, seq_len: int, rng: np.random.Generator, dtype):
    """Non-overlapping seq_len windows tiling one segment from a random offset."""
    if n == 0:
        return np.zeros(0, dtype), np.zeros(0, dtype)
    if n < seq_len:  # a segment shorter than a row: one PAD-filled row
        return np.full(1, base, dtype), np.full(1, n, dtype)
    count = n // seq_len
    offset = int(rng.integers(0, n - count * seq_len + 1))
    starts = (np.arange(count, dtype=dtype) * dtype(seq_len)) + dtype(base + offset)
    return starts, np.full(count, seq_len, dtype)


def resolve_shards(shards: str | Path | Sequence[str | Path]) -> tuple[list[Path], str]:
    """Shard paths from a glob pattern, a single file or a list; and a name for error messages."""
    if isinstance(shards, (str, Path)):
        text = str(shards)
        if glob.has_magic(text):
            paths = [Path(p) for p in sorted(glob.glob(text))]
            if not paths:
                raise DataError(f"{text}: no shard files match this pattern")
            return paths, text
        path = Path(text)
        if path.is_dir():
            raise DataError(f"{path}: is a directory; pass a glob such as {path}/fineweb_train_*.bin")
        return [path], text
    paths = [Path(p) for p in shards]
    if not paths:
        raise DataError("no shard files given (empty list)")
    return paths, f"{paths[0].parent}/{{{len(paths)} shards}}"


class ShardedLoader:
    """Seeded training rows from shards streamed through memory a group at a time.

    Schedule. Each epoch shuffles the shard list with a seed derived from (seed, epoch) and
    cuts it into groups of `shards_per_group` (the last group of an epoch may be smaller), so
    every shard is visited exactly once per epoch before any repeats, and the order differs
    from epoch to epoch. Inside a group the shards are laid out in file order, contiguously.
    A group serves rows until its budget is used, then the loader moves to the next group:
      - default: every row of the group once (docs: one row per document window; stream:
        group tokens // seq_len windows); the last batch wraps to the start of the group's
        order to fill up, so a group lasts ceil(rows / (batch rows x world_size)) batches;
      - batches_per_group=k: k batches for a full-size group, scaled by the group's tokens for
        a smaller (last) group, at least 1. If k batches need more rows than the group has,
        the group's order is cycled.

    Layouts. "docs": documents start at BOS (token 1); each becomes rows of seq_len tokens
    (long documents are windowed), PAD-filled to seq_len, served in a seeded random order: the
    rows of data.doc_windows (a chunked vectorized BOS search). A document that
    crosses from one shard into the next is whole when both shards land in the same group
    (they are then adjacent in the buffer); otherwise each part is its own, shorter document:
    the tail of the first shard ends early, and the head of the next (tokens before its first
    BOS) becomes a row of its own. "stream" and "packed" (the same rows; the trainer keeps
    attention inside documents for "packed"): contiguous seq_len windows tiling each run of
    file-consecutive shards from a random offset, in seeded random order (each token of the
    group at most once per pass, no window crosses into an unrelated shard; a run shorter
    than seq_len gives one PAD-filled row).

    Memory. One uint16 allocation, `buffer`, made once at construction and reused for the
    whole run. Its "half" holds the largest possible group (the sum of the shards_per_group
    largest shards). With prefetch (and more than one group) the buffer has TWO halves: the
    group being served and the next group, which a background thread reads straight into
    its half with read_shard(out=...) while training goes on; at a rotation the halves swap
    roles. So with prefetch the resident data is 2 x (shards_per_group shards), e.g. 800 MB
    for two 100M-token shards per group; without prefetch, or when the whole set is one group,
    the buffer is a single half and a group change loads synchronously. `buffer_bytes` is the
    real allocation: compare peak RSS against it (bench/loader.py does; measured peak RSS over
    baseline / buffer_bytes: 1.056 with 100M-token shards, 1.08 with 25M, and a fixed ~5 MB
    of code pages, thread and temporaries that dominates with tiny shards). Outside the buffer
    the loader holds the row index of the two groups (int32 starts and lengths, ~5 MB for a
    200M-token group of short documents at seq_len 2048) plus each batch it returns (rows
    are copied out with data.copy_rows). Pages of a half are first touched by its first load,
    which is therefore slower than later ones (page faults): the first rotation can wait a little.

    Waiting. Every group change records how long next_rows was blocked on the group's load
    (~0 when the previous group lasted longer than a load) in `last_wait_s` and `stats`, and
    calls on_wait(info) with a dict: epoch, group, shards, tokens, rows, wait_s, load_s,
    prefetched. The first group is loaded on the first next_rows (or after load_state_dict),
    so that wait is the full load time.

    Errors (DataError, one line naming the file or pattern): an empty glob, a shard that is
    unreadable (a directory, no permission) or truncated (header check of every shard at
    construction), a shard set smaller than one batch (at construction with batch_rows=, else
    on next_rows), and a token >= vocab_size (when its group is loaded, surfacing from the
    prefetch thread in next_rows; verify=True reads every shard at construction instead).

    Ranks. Every rank computes the same global order; a batch of `rows` per rank takes the next
    rows x world_size global rows and rank r keeps rows r, r + world_size, ...: ranks draw
    disjoint rows. Every rank holds the group in its own buffer.

    Resuming. The order is a pure function of (seed, epoch, group, row cursor), so state_dict()
    (plain ints and strings) is enough for a new loader to produce exactly the batches the old
    one would have; world_size may differ on resume (the cursor counts global rows).
    """

    def __init__(self, shards: str | Path | Sequence[str | Path], seq_len: int, layout: str,
                 pad_id: int, vocab_size: int, seed: int, shards_per_group: int = 2,
                 batches_per_group: int | None = None, rank: int = 0, world_size: int = 1,
                 prefetch: bool = True, on_wait: Callable[[dict], None] | None = None,
                 batch_rows: int | None = None, verify: bool = False):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        for name, value in (("seq_len", seq_len), ("shards_per_group", shards_per_group),
                            ("world_size", world_size), ("vocab_size", vocab_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if batches_per_group is not None and batches_per_group < 1:
            raise ValueError(f"batches_per_group must be >= 1 or None, got {batches_per_group}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.paths, self.source = resolve_shards(shards)
        self.counts = [read_shard_header(p) for p in self.paths]  # DataError names the file
        self.seq_len, self.layout, self.pad_id, self.vocab_size = seq_len, layout, pad_id, vocab_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shards_per_group = min(shards_per_group, len(self.paths))
        self.batches_per_group = batches_per_group
        self.on_wait = on_wait
        self.total_tokens = sum(self.counts)
        self.num_groups = -(-len(self.paths) // self.shards_per_group)
        self.half_tokens = sum(sorted(self.counts, reverse=True)[:self.shards_per_group])
        self.prefetch = bool(prefetch) and self.num_groups > 1
        halves = 2 if self.prefetch else 1
        self.buffer = np.empty(max(1, self.half_tokens) * halves, dtype=np.uint16)
        self._halves = [self.buffer[i * self.half_tokens:(i + 1) * self.half_tokens]
                        for i in range(halves)]
        self._index_dtype = np.int32 if self.half_tokens + 2 * seq_len < 2**31 else np.int64
        if batch_rows is not None:
            self._check_batch(batch_rows)
        if verify:  # read every shard once now, so a bad token fails here rather than mid-run
            for path, count in zip(self.paths, self.counts):
                read_shard(path, vocab_size, out=self._halves[0][:count])

        self.epoch = self.group = self.cursor = self.calls = 0
        self._loaded: list[GroupIndex | None] = [None] * halves
        self._pending: list[tuple[tuple[int, int], Future] | None] = [None] * halves
        self._current: int | None = None
        self._cancel = threading.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._schedule: dict[int, list[tuple[int, ...]]] = {}
        self.last_wait_s = 0.0
        self.stats = {"groups_served": 0, "shards_read": 0, "wait_s_total": 0.0, "wait_s_max": 0.0,
                      "last_wait_s": 0.0, "load_s_total": 0.0}

    # ------------------------------------------------------------ schedule

    @property
    def buffer_bytes(self) -> int:
        return int(self.buffer.nbytes)

    def epoch_groups(self, epoch: int) -> list[tuple[int, ...]]:
        """The shard indices of every group of an epoch, in visiting order (cached)."""
        if epoch not in self._schedule:
            order = np.random.default_rng([self.seed, 0, epoch]).permutation(len(self.paths))
            n = self.shards_per_group
            self._schedule = {k: v for k, v in self._schedule.items() if k >= epoch - 1}
            self._schedule[epoch] = [tuple(sorted(int(i) for i in order[a:a + n]))
                                     for a in range(0, order.size, n)]
        return self._schedule[epoch]

    def _next_key(self, key: tuple[int, int]) -> tuple[int, int]:
        epoch, group = key
        return (epoch, group + 1) if group + 1 < self.num_groups else (epoch + 1, 0)

    def _group_budget(self, g: GroupIndex) -> int | None:
        """Batches (calls) this group serves, or None for 'each row once'."""
        if self.batches_per_group is None:
            return None
        return max(1, round(self.batches_per_group * g.tokens / max(1, self.half_tokens)))

    def _exhausted(self, g: GroupIndex) -> bool:
        budget = self._group_budget(g)
        if g.num_rows == 0:
            return True
        return self.cursor >= g.num_rows if budget is None else self.calls >= budget

    # ------------------------------------------------------------ loading

    def _load(self, half: int, key: tuple[int, int], shards: tuple[int, ...]) -> GroupIndex:
        """Read a group's shards into one half of the buffer and index its rows (any thread)."""
        began = time.perf_counter()
        view = self._halves[half]
        old = self._loaded[half]
        self._loaded[half] = None
        reuse = old is not None and old.shards == shards
        offset, segments = 0, []
        for j, s in enumerate(shards):
            if self._cancel.is_set():
                raise _Cancelled()
            count = self.counts[s]
            if not reuse:
                read_shard(self.paths[s], self.vocab_size, out=view[offset:offset + count])
            if j and s == shards[j - 1] + 1:
                segments[-1] = (segments[-1][0], offset + count)
            else:
                segments.append((offset, offset + count))
            offset += count
        rng = np.random.default_rng([self.seed, 1, key[0], key[1]])
        dt = self._index_dtype
        parts = [doc_windows(view[a:b], self.seq_len, a, dt) if self.layout == "docs"
                 else _stream_rows(b - a, a, self.seq_len, rng, dt) for a, b in segments if b > a]
        starts = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, dt)
        lengths = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, dt)
        order = rng.permutation(starts.size)
        group = GroupIndex(key, shards, offset, segments, starts[order], lengths[order],
                           time.perf_counter() - began, not reuse)
        self._loaded[half] = group
        return group

    def _drain(self) -> None:
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

    def _start_prefetch(self, key: tuple[int, int]) -> None:
        half = 1 - self._current
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-prefetch")
        shards = self.epoch_groups(key[0])[key[1]]
        self._pending[half] = (key, self._executor.submit(self._load, half, key, shards))

    def _ensure_current(self) -> GroupIndex:
        key = (self.epoch, self.group)
        if self._current is not None:
            cur = self._loaded[self._current]
            if cur is not None and cur.key == key and self._pending[self._current] is None:
                return cur
        began = time.perf_counter()
        half = next((i for i, p in enumerate(self._pending) if p is not None and p[0] == key), None)
        if half is not None:
            future = self._pending[half][1]
            try:
                group = future.result()
            finally:
                self._pending[half] = None
            prefetched = True
        else:
            self._drain()
            shards = self.epoch_groups(key[0])[key[1]]
            reusable = [i for i, g in enumerate(self._loaded) if g is not None and g.shards == shards]
            if reusable:
                half = reusable[0]
            elif len(self._halves) == 1 or self._current is None:
                half = 0
            else:
                half = 1 - self._current
            group = self._load(half, key, shards)
            prefetched = False
        wait = time.perf_counter() - began
        self._current = half
        if self.prefetch:
            self._start_prefetch(self._next_key(key))
        self.last_wait_s = wait
        st = self.stats
        st["groups_served"] += 1
        st["shards_read"] += len(group.shards) if group.read else 0
        st["wait_s_total"] += wait
        st["wait_s_max"] = max(st["wait_s_max"], wait)
        st["last_wait_s"] = wait
        st["load_s_total"] += group.load_s
        if self.on_wait is not None:
            self.on_wait({"epoch": key[0], "group": key[1], "tokens": group.tokens,
                          "shards": [self.paths[s].name for s in group.shards],
                          "rows": group.num_rows, "wait_s": wait, "load_s": group.load_s,
                          "prefetched": prefetched})
        return group

    # ------------------------------------------------------------ serving

    def _check_batch(self, rows: int) -> None:
        need = rows * self.seq_len * self.world_size
        if self.total_tokens < need:
            raise DataError(f"{self.source}: {self.total_tokens:,} tokens in {len(self.paths)} shards "
                            f"are fewer than one batch ({rows} rows x {self.seq_len} x world size "
                            f"{self.world_size} = {need:,} tokens)")

    def next_rows(self, rows: int) -> np.ndarray:
        """The next `rows` rows for this rank ([rows, seq_len] int64); ranks take disjoint rows."""
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        self._check_batch(rows)
        group = self._ensure_current()
        for _ in range(2 * self.num_groups + 1):  # skip groups with no rows (empty shards)
            if not self._exhausted(group):
                break
            self._advance()
            group = self._ensure_current()
        else:
            raise DataError(f"{self.source}: no group yields a row")
        span = rows * self.world_size
        pick = np.arange(self.cursor + self.rank, self.cursor + span, self.world_size)
        starts = np.take(group.starts, pick, mode="wrap")
        lengths = np.take(group.lengths, pick, mode="wrap")
        out = copy_rows(self._halves[self._current][:group.tokens], starts, lengths,
                        self.seq_len, self.pad_id)
        self.cursor += span
        self.calls += 1
        if self._exhausted(group):
            self._advance()  # bookkeeping only; the next call switches to the loaded group
        return out

    def _advance(self) -> None:
        self.epoch, self.group = self._next_key((self.epoch, self.group))
        self.cursor = self.calls = 0

    # ------------------------------------------------------------ resuming

    def _fingerprint(self) -> str:
        h = hashlib.sha1()
        for p, c in zip(self.paths, self.counts):
            h.update(f"{p.name}:{c};".encode())
        return h.hexdigest()

    def state_dict(self) -> dict:
        """Plain ints/strings: where the loader is; the RNGs are derived from seed and position."""
        return {"version": STATE_VERSION, "epoch": int(self.epoch), "group": int(self.group),
                "cursor": int(self.cursor), "calls": int(self.calls), "seed": int(self.seed),
                "layout": self.layout, "seq_len": int(self.seq_len),
                "shards_per_group": int(self.shards_per_group),
                "batches_per_group": self.batches_per_group, "shards": self._fingerprint(),
                "rng": {"shard_order": [self.seed, 0, int(self.epoch)],
                        "group_rows": [self.seed, 1, int(self.epoch), int(self.group)]}}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        for name in ("seed", "layout", "seq_len", "shards_per_group", "batches_per_group", "shards"):
            if state.get(name) != mine[name]:
                what = "shard set (names/token counts)" if name == "shards" else name
                raise ValueError(f"loader state was saved with a different {what}: "
                                 f"{state.get(name)!r} != {mine[name]!r}")
        if not 0 <= state["group"] < self.num_groups:
            raise ValueError(f"loader state group {state['group']} outside {self.num_groups} groups")
        self._drain()
        self.epoch, self.group = int(state["epoch"]), int(state["group"])
        self.cursor, self.calls = int(state["cursor"]), int(state["calls"])
        self._current = None  # the next call loads (or reuses) the group and restarts prefetch

    # ------------------------------------------------------------ lifetime

    def close(self) -> None:
        self._drain()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __enter__(self) -> "ShardedLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def describe(self) -> str:
        return (f"{len(self.paths)} shards, {self.total_tokens:,} tokens, {self.num_groups} groups of "
                f"{self.shards_per_group}, buffer {self.buffer_bytes / 2**20:,.1f} MiB "
                f"({'2 halves, prefetch' if self.prefetch else '1 half, no prefetch'})")


class _Cancelled(Exception):
    """A prefetch stopped by load_state_dict/close."""
