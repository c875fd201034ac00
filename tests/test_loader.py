"""ShardedLoader: schedule, layouts, resume, ranks, errors, one buffer."""
from __future__ import annotations

import json
import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import mdlm_golf.data.rows as rows_mod
from mdlm_golf.data import DataError, ShardedLoader
from mdlm_golf.data.rows import copy_rows, doc_windows
from mdlm_golf.data.shards import write_shard

VOCAB = 65536  # every non-BOS token encodes its global position: 2 + p
PAD = 0  # never a data token
SEQ = 32
SIZES = [3000, 2500, 3100, 2800, 3000, 1700]  # 6 shards, uneven; docs cross shard boundaries


def make_stream(total: int, seed: int = 0, max_doc: int = 100) -> np.ndarray:
    """Documents of 2..max_doc tokens (many longer than SEQ): BOS, then position ids."""
    rng = np.random.default_rng(seed)
    tokens = (2 + np.arange(total)).astype(np.uint16)
    starts = np.cumsum(rng.integers(2, max_doc, size=total // 2))
    tokens[0] = 1
    tokens[starts[starts < total]] = 1
    return tokens


@pytest.fixture
def shards(tmp_path):
    stream = make_stream(sum(SIZES))
    bounds = np.cumsum([0] + SIZES)
    paths = []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        path = tmp_path / f"fineweb_train_{i:06d}.bin"
        write_shard(path, stream[a:b])
        paths.append(path)
    return tmp_path, stream, bounds, paths


def make(tmp_path, layout="docs", **kw):
    args = dict(seq_len=SEQ, layout=layout, pad_id=PAD, vocab_size=VOCAB, seed=7)
    args.update(kw)
    return ShardedLoader(str(tmp_path / "fineweb_train_*.bin"), **args)


def row_len(row: np.ndarray) -> int:
    return int(np.count_nonzero(row != PAD))


def row_pos(row: np.ndarray) -> int | None:
    """Global position of a row's first token (None for a lone BOS)."""
    if row[0] != 1:
        return int(row[0]) - 2
    return int(row[1]) - 3 if row_len(row) > 1 else None


def expected_rows(loader: ShardedLoader, stream, bounds, epoch: int) -> Counter:
    """Every row an epoch should serve: data.doc_windows over each run of consecutive shards."""
    out = Counter()
    for group in loader.schedule.epoch_groups(epoch):
        runs = []
        for s in group:
            if runs and runs[-1][1] == s:
                runs[-1][1] = s + 1
            else:
                runs.append([s, s + 1])
        for a, b in runs:
            seg = stream[bounds[a]:bounds[b]]
            starts, lengths = doc_windows(seg, SEQ)
            for r in copy_rows(seg, starts, lengths, SEQ, PAD):
                out[r.tobytes()] += 1
    return out


def test_chunked_bos_search_matches_a_whole_array_search(monkeypatch):
    rng = np.random.default_rng(3)
    for case in range(20):
        toks = rng.integers(1, 6, size=int(rng.integers(1, 300))).astype(np.uint16)
        if case % 3 == 0:
            toks[0] = 1
        if case == 1:
            toks[:] = 4  # no BOS at all
        base = int(rng.integers(0, 1000))
        monkeypatch.setattr(rows_mod, "BOS_CHUNK", 1 << 20)
        ref_s, ref_l = doc_windows(toks, 16)
        monkeypatch.setattr(rows_mod, "BOS_CHUNK", 7)  # BOS search across many chunk edges
        starts, lengths = doc_windows(toks, 16, base, np.int32)
        np.testing.assert_array_equal(starts, ref_s + base)
        np.testing.assert_array_equal(lengths, ref_l)


def test_copy_rows_matches_a_fancy_indexed_gather():
    rng = np.random.default_rng(4)
    toks = rng.integers(0, 1024, size=5000).astype(np.uint16)
    for seq_len in (1, 7, 64):
        starts = rng.integers(0, toks.size - seq_len, size=50).astype(np.int32)
        lengths = rng.integers(1, seq_len + 1, size=50).astype(np.int32)
        got = copy_rows(toks, starts, lengths, seq_len, 1025)
        assert got.dtype == np.int64 and got.shape == (50, seq_len)
        cols = np.arange(seq_len)
        want = np.where(cols < lengths[:, None], toks[starts[:, None] + cols], 1025)
        np.testing.assert_array_equal(got, want)


def test_epoch_visits_every_shard_once_and_order_changes(shards):
    tmp_path, stream, bounds, paths = shards
    log = []
    ld = make(tmp_path, on_wait=log.append)
    assert ld.num_groups == 3
    e0, e1 = ld.schedule.epoch_groups(0), ld.schedule.epoch_groups(1)
    for groups in (e0, e1):
        assert sorted(s for g in groups for s in g) == list(range(len(paths)))
    assert e0 != e1
    # seed 7: epoch 0 has no file-adjacent shards in a group, epoch 1 has (2, 3): both cases
    assert not any(b == a + 1 for a, b in e0) and (2, 3) in e1
    served = [Counter(), Counter()]
    while ld.epoch < 2:
        epoch = ld.epoch
        for r in ld.next_rows(4):
            served[epoch][r.tobytes()] += 1
    for epoch in (0, 1):
        want, got = expected_rows(ld, stream, bounds, epoch), served[epoch]
        assert set(got) == set(want)  # every row of every shard, and only those
        assert all(got[k] >= n for k, n in want.items())
        assert sum(got.values()) - sum(want.values()) < 4 * ld.num_groups  # only the wrap fill
    assert len(log) == 6 and [i["prefetched"] for i in log] == [False] + [True] * 5  # loaded ahead
    for epoch, groups in ((0, e0), (1, e1)):
        infos = log[3 * epoch:3 * epoch + 3]
        assert [(i["epoch"], i["group"]) for i in infos] == [(epoch, 0), (epoch, 1), (epoch, 2)]
        assert [tuple(i["shards"]) for i in infos] == [tuple(paths[s].name for s in g) for g in groups]


def test_docs_rows_start_at_bos_or_continue_a_document(shards):
    tmp_path, stream, bounds, _ = shards
    bos = np.flatnonzero(stream == 1)
    ld = make(tmp_path)
    padded = 0
    for _ in range(60):
        for row in ld.next_rows(4):
            n = row_len(row)
            assert n >= 1 and np.all(row[n:] == PAD)
            padded += n < SEQ
            p = row_pos(row)
            if p is None:
                continue
            np.testing.assert_array_equal(row[:n], stream[p:p + n])
            if row[0] == 1:
                continue
            last_bos = bos[np.searchsorted(bos, p, side="right") - 1]
            shard_start = bounds[np.searchsorted(bounds, p, side="right") - 1]
            assert p == shard_start or any(p - a >= SEQ and (p - a) % SEQ == 0
                                           for a in (last_bos, shard_start)), p
            assert not np.any(stream[p + 1:p + n] == 1)  # a row never runs into the next document
    assert padded > 0


def test_stream_rows_are_contiguous_windows(shards):
    tmp_path, stream, bounds, _ = shards
    ld = make(tmp_path, layout="stream")
    seen = set()
    for _ in range(40):
        for row in ld.next_rows(4):
            p = row_pos(row)
            assert row_len(row) == SEQ
            np.testing.assert_array_equal(row, stream[p:p + SEQ])
            seen.add(p)
    assert len(seen) > 100


def run(ld, n, rows=4):
    return [ld.next_rows(rows) for _ in range(n)]


@pytest.mark.parametrize("layout", ["docs", "stream"])
@pytest.mark.parametrize("prefetch", [True, False])
def test_resume_is_exact_across_rotations(shards, layout, prefetch):
    tmp_path = shards[0]
    log = []
    a = make(tmp_path, layout=layout, prefetch=prefetch, batches_per_group=5, on_wait=log.append)
    run(a, 7)  # into the second group
    state = json.loads(json.dumps(a.state_dict()))
    assert pickle.loads(pickle.dumps(state)) == state
    after = run(a, 20)  # crosses several rotations and an epoch boundary
    assert len(log) >= 5 and log[-1]["epoch"] >= 1
    b = make(tmp_path, layout=layout, prefetch=prefetch, batches_per_group=5)
    b.load_state_dict(state)
    for x, y in zip(after, run(b, 20)):
        np.testing.assert_array_equal(x, y)
    # the same batches whatever the prefetch setting, and snapshots at a group edge resume too
    c = make(tmp_path, layout=layout, prefetch=not prefetch, batches_per_group=5)
    first = run(c, 10)
    np.testing.assert_array_equal(first[7], after[0])
    edge = None
    while edge is None:  # a snapshot taken right after a group's last batch
        run(c, 1)
        state = c.state_dict()
        edge = state if state["cursor"] == 0 else None
    d = make(tmp_path, layout=layout, prefetch=prefetch, batches_per_group=5)
    d.load_state_dict(edge)
    for x, y in zip(run(d, 8), run(c, 8)):
        np.testing.assert_array_equal(x, y)


def test_resume_default_budget_and_mid_prefetch(shards):
    tmp_path = shards[0]
    a = make(tmp_path)
    run(a, 3)
    b = make(tmp_path)
    run(b, 1)  # b is mid-group with a prefetch in flight; load_state_dict must drop it
    b.load_state_dict(a.state_dict())
    for x, y in zip(run(a, 200), run(b, 200)):
        np.testing.assert_array_equal(x, y)


def test_state_mismatch_is_rejected(shards):
    tmp_path = shards[0]
    state = make(tmp_path).state_dict()
    with pytest.raises(ValueError, match="seq_len"):
        make(tmp_path, seq_len=16).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        make(tmp_path, seed=8).load_state_dict(state)


@pytest.mark.parametrize("layout", ["docs", "stream"])
def test_ranks_draw_disjoint_rows(shards, layout):
    tmp_path = shards[0]
    ranks = [make(tmp_path, layout=layout, rank=r, world_size=2) for r in range(2)]
    whole = make(tmp_path, layout=layout)
    for _ in range(30):
        r0, r1 = (ld.next_rows(4) for ld in ranks)
        both = whole.next_rows(8)
        np.testing.assert_array_equal(both[0::2], r0)
        np.testing.assert_array_equal(both[1::2], r1)
        p0 = {row_pos(r) for r in r0} - {None}
        p1 = {row_pos(r) for r in r1} - {None}
        assert not p0 & p1


def test_buffer_is_allocated_once(shards):
    tmp_path = shards[0]
    ld = make(tmp_path, batches_per_group=3)
    buf_id, ptr = id(ld.buffer), ld.buffer.ctypes.data
    assert ld.buffer.nbytes == 2 * 2 * (3100 + 3000)  # two halves, each the two largest shards
    halves_seen = set()
    for _ in range(25):
        ld.next_rows(4)
        halves_seen.add(ld.group_buffer.current)
        assert id(ld.buffer) == buf_id and ld.buffer.ctypes.data == ptr
        assert all(np.shares_memory(h, ld.buffer) for h in ld.group_buffer.halves)
    assert halves_seen == {0, 1}
    assert ld.stats["groups_served"] >= 8 and ld.stats["shards_read"] >= 16
    assert make(tmp_path, prefetch=False).buffer.nbytes == 2 * (3100 + 3000)


def test_single_group_loads_once(shards):
    tmp_path = shards[0]
    ld = make(tmp_path, shards_per_group=10)
    assert ld.num_groups == 1 and not ld.prefetch
    while ld.epoch < 2:
        ld.next_rows(4)
    assert ld.stats["shards_read"] == 6 and ld.stats["groups_served"] == 2


# ------------------------------------------------------------------ errors

def test_empty_glob(tmp_path):
    with pytest.raises(DataError, match="fineweb_train_\\*.bin: no shard files match"):
        make(tmp_path)
    with pytest.raises(DataError, match="no shard files given"):
        ShardedLoader([], SEQ, "docs", PAD, VOCAB, 0)


def test_too_few_tokens_for_a_batch(shards):
    tmp_path = shards[0]
    total = sum(SIZES)
    with pytest.raises(DataError, match=r"fewer than one batch"):
        make(tmp_path, batch_rows=total // SEQ + 1)
    ld = make(tmp_path, world_size=4)
    with pytest.raises(DataError, match=r"fineweb_train_\*\.bin: .* world size 4"):
        ld.next_rows(total // SEQ // 4 + 1)


def test_token_outside_vocab(shards):
    tmp_path, stream, bounds, paths = shards
    with pytest.raises(DataError, match=r"fineweb_train_00000\d\.bin: token \d+ at position \d+ is >= vocab"):
        make(tmp_path, vocab_size=2048, verify=True)
    small = np.full(100, 5, np.uint16)
    small[::10] = 1
    for p in paths:
        write_shard(p, small)
    write_shard(paths[4], np.full(100, 3000, np.uint16))  # a shard from a bigger vocabulary
    ld = make(tmp_path, vocab_size=1024, seq_len=8, batches_per_group=2)
    with pytest.raises(DataError, match="fineweb_train_000004.bin: token 3000"):
        for _ in range(20):
            ld.next_rows(2)


def test_unreadable_shards(shards, monkeypatch):
    tmp_path, _, _, paths = shards
    bad = tmp_path / "fineweb_train_000099.bin"
    bad.mkdir()
    with pytest.raises(DataError, match="fineweb_train_000099.bin: cannot read shard"):
        make(tmp_path)
    bad.rmdir()
    with open(paths[2], "r+b") as f:
        f.truncate(1024 + 100)
    with pytest.raises(DataError, match="fineweb_train_000002.bin: header declares"):
        make(tmp_path)
    paths[2].unlink()
    if os.geteuid() != 0:
        paths[3].chmod(0)
    else:  # root reads anything: simulate the permission error
        real_open = open

        def fake_open(path, *a, **k):
            if Path(path) == paths[3]:
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *a, **k)
        monkeypatch.setattr("mdlm_golf.data.shards.open", fake_open, raising=False)
    with pytest.raises(DataError, match="fineweb_train_000003.bin: cannot read shard \\(Permission denied\\)"):
        make(tmp_path)
