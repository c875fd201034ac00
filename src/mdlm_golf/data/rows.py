"""Row layouts: how a group's tokens become [seq_len] training rows, and copying rows out as a batch.

"docs": documents start at BOS (token 1); each becomes rows of seq_len tokens (long documents are
windowed), PAD-filled to seq_len: the rows of doc_windows (a chunked vectorized BOS search). A
document that crosses from one shard into the next is whole when both shards land in the same group
(they are then adjacent in the buffer); otherwise each part is its own, shorter document: the tail of
the first shard ends early, and the head of the next (tokens before its first BOS) becomes a row of
its own. "stream" and "packed" (the same rows; the trainer keeps attention inside documents for
"packed"): contiguous seq_len windows tiling each run of file-consecutive shards from a random offset
(each token of the group at most once per pass, no window crosses into an unrelated shard; a run
shorter than seq_len gives one PAD-filled row). Either way the rows are served in a seeded random order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import BOS_ID

BOS_CHUNK = 1 << 20  # tokens per step of the BOS search: bounds its temporary to 1 MB


def doc_windows(tokens: np.ndarray, seq_len: int, base: int = 0,
                dtype: type = np.int64) -> tuple[np.ndarray, np.ndarray]:
    """(start + base, length) of every row of the docs layout: each document cut into seq_len windows.

    Text before the first BOS counts as a document. The BOS search runs BOS_CHUNK tokens at a
    time, so a 200M-token group never needs a 200M-element boolean temporary.
    """
    n = tokens.size
    found = [np.flatnonzero(tokens[a:a + BOS_CHUNK] == BOS_ID).astype(dtype) + dtype(a)
             for a in range(0, n, BOS_CHUNK)]
    doc_starts = np.concatenate(found) if found else np.zeros(0, dtype)
    if doc_starts.size == 0 or doc_starts[0] != 0:
        doc_starts = np.concatenate([np.zeros(1, dtype), doc_starts])
    doc_ends = np.append(doc_starts[1:], dtype(n))
    per_doc = (doc_ends - doc_starts + dtype(seq_len - 1)) // dtype(seq_len)
    first = np.repeat(np.cumsum(per_doc, dtype=dtype) - per_doc, per_doc)
    starts = (np.arange(first.size, dtype=dtype) - first) * dtype(seq_len)  # window number in its doc
    starts += np.repeat(doc_starts, per_doc)
    lengths = np.minimum(np.repeat(doc_ends, per_doc) - starts, dtype(seq_len))
    return starts + dtype(base), lengths


def stream_windows(n: int, base: int, seq_len: int, rng: np.random.Generator,
                   dtype: type = np.int64) -> tuple[np.ndarray, np.ndarray]:
    """(start + base, length) of non-overlapping seq_len windows tiling n tokens from a random offset."""
    if n == 0:
        return np.zeros(0, dtype), np.zeros(0, dtype)
    if n < seq_len:  # a segment shorter than a row: one PAD-filled row
        return np.full(1, base, dtype), np.full(1, n, dtype)
    count = n // seq_len
    offset = int(rng.integers(0, n - count * seq_len + 1))
    starts = (np.arange(count, dtype=dtype) * dtype(seq_len)) + dtype(base + offset)
    return starts, np.full(count, seq_len, dtype)


def copy_rows(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
              seq_len: int, pad_id: int) -> np.ndarray:
    """Rows tokens[start:start+length], PAD-filled to seq_len, as int64 [rows, seq_len].

    One slice copy per row (a loop over rows, not tokens): no [rows, seq_len] index temporaries,
    several times faster than a fancy-indexed gather.
    """
    out = np.empty((starts.size, seq_len), dtype=np.int64)
    for row, start, length in zip(out, starts.tolist(), lengths.tolist()):
        row[:length] = tokens[start:start + length]
        row[length:] = pad_id
    return out


def index_dtype(max_tokens: int, seq_len: int) -> type:
    """int32 row indices where they fit (half the index memory of a 200M-token group), else int64."""
    return np.int32 if max_tokens + 2 * seq_len < 2**31 else np.int64


@dataclass(frozen=True)
class RowLayout:
    """One layout at one row length: a group's rows, in the serving order seeded by (seed, group key)."""

    layout: str  # one of config.LAYOUTS
    seq_len: int
    seed: int
    dtype: type = np.int64  # of the row starts and lengths

    def rng_seed(self, key: tuple[int, int]) -> list[int]:
        """Seed of the group (epoch, group)'s stream offsets and row order."""
        return [self.seed, 1, key[0], key[1]]

    def index(self, tokens: np.ndarray, segments: list[tuple[int, int]],
              key: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(starts, lengths) into `tokens` of every row of its [start, end) segments, in serving order."""
        rng = np.random.default_rng(self.rng_seed(key))
        dt = self.dtype
        parts = [doc_windows(tokens[a:b], self.seq_len, a, dt) if self.layout == "docs"
                 else stream_windows(b - a, a, self.seq_len, rng, dt) for a, b in segments if b > a]
        starts = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, dt)
        lengths = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, dt)
        order = rng.permutation(starts.size)
        return starts[order], lengths[order]
