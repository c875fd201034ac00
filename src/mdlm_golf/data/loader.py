"""Training batches from a shard set too large for memory: a few shards at a time, loaded ahead."""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..config import LAYOUTS
from .groups import GroupBuffer, GroupIndex, GroupSchedule, group_capacity
from .rows import RowLayout, copy_rows, index_dtype
from .shards import DataError, read_shard_header, resolve_shards

STATE_VERSION = 1
STATE_CHECKED = ("seed", "layout", "seq_len", "shards_per_group", "batches_per_group", "shards")


def check_loader_args(seq_len: int, layout: str, vocab_size: int, seed: int, shards_per_group: int,
                      batches_per_group: int | None, rank: int, world_size: int) -> None:
    """ValueError for a setting no loader can serve."""
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


def read_shard_set(shards: str | Path | Sequence[str | Path]) -> tuple[list[Path], str, list[int]]:
    """The shard paths, a name for messages, and each shard's token count from its checked header
    (DataError names the file)."""
    paths, source = resolve_shards(shards)
    return paths, source, [read_shard_header(p) for p in paths]


def check_batch_fits(source: str, counts: list[int], rows: int, seq_len: int, world_size: int) -> None:
    """DataError unless the shards hold at least one batch of `rows` rows per process."""
    need = rows * seq_len * world_size
    if sum(counts) < need:
        raise DataError(f"{source}: {sum(counts):,} tokens in {len(counts)} shards are fewer than one batch "
                        f"({rows} rows x {seq_len} x world size {world_size} = {need:,} tokens)")


class ShardedLoader:
    """Seeded training rows from shards streamed through memory a group at a time.

    Schedule. Groups of `shards_per_group` shards, every shard once per epoch, in an order that
    differs from epoch to epoch (data.groups.GroupSchedule). A group's shards lie in file order,
    contiguously, and its rows (data.rows: "docs", "stream" or "packed") are served in a seeded
    random order. A group serves rows until its budget is used, then the loader moves to the next group:
      - default: every row of the group once (docs: one row per document window; stream:
        group tokens // seq_len windows); the last batch wraps to the start of the group's
        order to fill up, so a group lasts ceil(rows / (batch rows x world_size)) batches;
      - batches_per_group=k: k batches for a full-size group, scaled by the group's tokens for
        a smaller (last) group, at least 1. If k batches need more rows than the group has,
        the group's order is cycled.

    Memory: data.groups.GroupBuffer, two halves (the group served, the next one read in a
    background thread) with prefetch and more than one group, else one. `buffer_bytes` is the
    real allocation.

    Waiting. Every group change records how long next_rows was blocked on the group's load
    (~0 when the previous group lasted longer than a load) in `stats`, and calls on_wait(info)
    with a dict: epoch, group, shards, tokens, rows, wait_s, load_s, prefetched. The first group
    is loaded on the first next_rows (or after load_state_dict), so that wait is the full load time.

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
        check_loader_args(seq_len, layout, vocab_size, seed, shards_per_group, batches_per_group,
                          rank, world_size)
        self.paths, self.source, self.counts = read_shard_set(shards)
        self.seq_len, self.layout, self.pad_id, self.vocab_size = seq_len, layout, pad_id, vocab_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shards_per_group = min(shards_per_group, len(self.paths))
        self.batches_per_group = batches_per_group
        self.on_wait = on_wait
        self.total_tokens = sum(self.counts)
        self.schedule = GroupSchedule(len(self.paths), self.shards_per_group, seed)
        self.num_groups = self.schedule.num_groups
        self.half_tokens = group_capacity(self.counts, self.shards_per_group)
        self.prefetch = bool(prefetch) and self.num_groups > 1
        rows = RowLayout(layout, seq_len, seed, index_dtype(self.half_tokens, seq_len))
        self.group_buffer = GroupBuffer(self.paths, self.counts, self.half_tokens,
                                        2 if self.prefetch else 1, vocab_size, rows)
        if batch_rows is not None:
            self._check_batch(batch_rows)
        if verify:
            self.group_buffer.verify()
        self.epoch = self.group = self.cursor = self.calls = 0
        self.stats = {"groups_served": 0, "shards_read": 0, "wait_s_total": 0.0, "wait_s_max": 0.0,
                      "last_wait_s": 0.0, "load_s_total": 0.0}

    @property
    def buffer(self) -> np.ndarray:
        return self.group_buffer.buffer

    @property
    def buffer_bytes(self) -> int:
        return int(self.buffer.nbytes)

    # ------------------------------------------------------------ serving

    def _exhausted(self, g: GroupIndex) -> bool:
        """Whether the group has served its budget: each row once, or its share of batches_per_group."""
        if g.num_rows == 0:
            return True
        if self.batches_per_group is None:
            return self.cursor >= g.num_rows
        return self.calls >= max(1, round(self.batches_per_group * g.tokens / max(1, self.half_tokens)))

    def _advance(self) -> None:
        self.epoch, self.group = self.schedule.next_key((self.epoch, self.group))
        self.cursor = self.calls = 0

    def _ensure_current(self) -> GroupIndex:
        """The group at (epoch, group), loaded; a change of group also starts the next prefetch."""
        key = (self.epoch, self.group)
        group = self.group_buffer.current_group(key)
        if group is not None:
            return group
        began = time.perf_counter()
        group, prefetched = self.group_buffer.acquire(key, self.schedule.shards(key))
        wait = time.perf_counter() - began
        if self.prefetch:
            following = self.schedule.next_key(key)
            self.group_buffer.prefetch(following, self.schedule.shards(following))
        self._record_wait(group, wait, prefetched)
        return group

    def _record_wait(self, group: GroupIndex, wait: float, prefetched: bool) -> None:
        st = self.stats
        st["groups_served"] += 1
        st["shards_read"] += len(group.shards) if group.read else 0
        st["wait_s_total"] += wait
        st["wait_s_max"] = max(st["wait_s_max"], wait)
        st["last_wait_s"] = wait
        st["load_s_total"] += group.load_s
        if self.on_wait is not None:
            self.on_wait({"epoch": group.key[0], "group": group.key[1], "tokens": group.tokens,
                          "shards": [self.paths[s].name for s in group.shards],
                          "rows": group.num_rows, "wait_s": wait, "load_s": group.load_s,
                          "prefetched": prefetched})

    def _check_batch(self, rows: int) -> None:
        check_batch_fits(self.source, self.counts, rows, self.seq_len, self.world_size)

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
        out = copy_rows(self.group_buffer.tokens(group), starts, lengths, self.seq_len, self.pad_id)
        self.cursor += span
        self.calls += 1
        if self._exhausted(group):
            self._advance()  # bookkeeping only; the next call switches to the loaded group
        return out

    # ------------------------------------------------------------ resuming

    def _fingerprint(self) -> str:
        h = hashlib.sha1()
        for p, c in zip(self.paths, self.counts):
            h.update(f"{p.name}:{c};".encode())
        return h.hexdigest()

    def state_dict(self) -> dict:
        """Plain ints/strings: where the loader is; the RNGs are derived from seed and position."""
        key = (int(self.epoch), int(self.group))
        return {"version": STATE_VERSION, "epoch": key[0], "group": key[1],
                "cursor": int(self.cursor), "calls": int(self.calls), "seed": int(self.seed),
                "layout": self.layout, "seq_len": int(self.seq_len),
                "shards_per_group": int(self.shards_per_group),
                "batches_per_group": self.batches_per_group, "shards": self._fingerprint(),
                "rng": {"shard_order": self.schedule.rng_seed(key[0]),
                        "group_rows": self.group_buffer.rows.rng_seed(key)}}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict() of a loader over the same shards and settings."""
        mine = self.state_dict()
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        for name in STATE_CHECKED:
            if state.get(name) != mine[name]:
                what = "shard set (names/token counts)" if name == "shards" else name
                raise ValueError(f"loader state was saved with a different {what}: "
                                 f"{state.get(name)!r} != {mine[name]!r}")
        if not 0 <= state["group"] < self.num_groups:
            raise ValueError(f"loader state group {state['group']} outside {self.num_groups} groups")
        self.group_buffer.reset()  # the next call loads (or reuses) the group and restarts prefetch
        self.epoch, self.group = int(state["epoch"]), int(state["group"])
        self.cursor, self.calls = int(state["cursor"]), int(state["calls"])

    # ------------------------------------------------------------ lifetime

    def close(self) -> None:
        self.group_buffer.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown, or a constructor that failed early
            pass

    def describe(self) -> str:
        return (f"{len(self.paths)} shards, {self.total_tokens:,} tokens, {self.num_groups} groups of "
                f"{self.shards_per_group}, buffer {self.buffer_bytes / 2**20:,.1f} MiB "
                f"({'2 halves, prefetch' if self.prefetch else '1 half, no prefetch'})")
