"""Shard format, byte table, corpus preparation and batch assembly (mdlm_golf.data)."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest

from conftest import SHARD_TOKENS, VAL_DOCS
from mdlm_golf.config import BOS_ID, Config
from mdlm_golf.data import ByteTable, DataError, ShardedLoader, load_split, load_tokenizer, prepare
from mdlm_golf.data.corpus import iter_docs
from mdlm_golf.data.rows import copy_rows, doc_windows
from mdlm_golf.data.shards import HEADER_BYTES, read_shard, read_shard_header, shard_paths, write_shard

PAD = Config().tokens.pad  # vocab + 1
UNK_ID = 3
THREADS = os.cpu_count() or 1


def assert_one_line_naming(err: pytest.ExceptionInfo, path) -> None:
    message = str(err.value)
    assert "\n" not in message, message
    assert str(path) in message, message


# ---------------------------------------------------------------- shard format

def test_shard_round_trip_and_exact_layout(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 65536, size=1000).astype(np.uint16)
    tokens[:3] = (0, 65535, 1)
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, tokens)

    raw = path.read_bytes()
    assert len(raw) == 256 * 4 + 2 * tokens.size
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header.size == 256
    assert header[:3].tolist() == [20240520, 1, tokens.size]
    assert not header[3:].any()
    np.testing.assert_array_equal(np.frombuffer(raw[1024:], dtype="<u2"), tokens)

    assert read_shard_header(path) == tokens.size
    back = read_shard(path)
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, tokens)

    # straight into a slice of a bigger pre-allocated buffer; the rest stays untouched
    buf = np.full(tokens.size + 20, 7, dtype=np.uint16)
    got = read_shard(path, vocab_size=65536, out=buf[10:10 + tokens.size])
    np.testing.assert_array_equal(buf[10:10 + tokens.size], tokens)
    assert np.shares_memory(got, buf)
    assert (buf[:10] == 7).all() and (buf[-10:] == 7).all()

    with pytest.raises(DataError) as err:
        read_shard(path, out=np.empty(tokens.size - 1, dtype=np.uint16))
    assert_one_line_naming(err, path)


def test_empty_shard_and_out_of_range_tokens(tmp_path):
    empty = tmp_path / "empty.bin"
    write_shard(empty, np.zeros(0, dtype=np.int64))
    assert empty.stat().st_size == HEADER_BYTES
    assert read_shard(empty, vocab_size=1024).size == 0
    for bad in ([-1, 5], [65536]):
        with pytest.raises(DataError):
            write_shard(tmp_path / "bad.bin", np.array(bad))
    assert not (tmp_path / "bad.bin").exists()


def test_load_split_concatenates_shards_in_order(tmp_path):
    parts = [np.arange(i * 100, i * 100 + 50 + i, dtype=np.uint16) for i in range(3)]
    for i, part in enumerate(parts):
        write_shard(tmp_path / f"fineweb_val_{i:06d}.bin", part)
    write_shard(tmp_path / "fineweb_train_000000.bin", np.array([999], dtype=np.uint16))
    assert [p.name for p in shard_paths(tmp_path, "val")] == [f"fineweb_val_{i:06d}.bin" for i in range(3)]
    np.testing.assert_array_equal(load_split(tmp_path, "val", 1024), np.concatenate(parts))
    with pytest.raises(DataError) as err:
        load_split(tmp_path, "train", 999)
    assert_one_line_naming(err, tmp_path / "fineweb_train_000000.bin")


@pytest.fixture
def good_shard(tmp_path):
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, np.arange(1, 101, dtype=np.uint16))
    return path


def test_truncated_shard(good_shard):
    raw = good_shard.read_bytes()
    for size in (len(raw) - 1, len(raw) - 2, 1024, 100, 0):
        good_shard.write_bytes(raw[:size])
        with pytest.raises(DataError) as err:
            read_shard(good_shard)
        assert_one_line_naming(err, good_shard)
    good_shard.write_bytes(raw + b"\0\0")  # trailing garbage is as wrong as missing bytes
    with pytest.raises(DataError) as err:
        read_shard_header(good_shard)
    assert_one_line_naming(err, good_shard)


def test_wrong_magic_and_version(good_shard):
    raw = bytearray(good_shard.read_bytes())
    for word, value in ((0, 20240521), (0, 0), (1, 2)):
        bad = bytearray(raw)
        bad[4 * word:4 * word + 4] = np.array([value], dtype="<i4").tobytes()
        good_shard.write_bytes(bytes(bad))
        with pytest.raises(DataError) as err:
            read_shard(good_shard)
        assert_one_line_naming(err, good_shard)
    good_shard.write_bytes(bytes(raw[:4][::-1] + raw[4:]))  # big-endian magic is not ours either
    with pytest.raises(DataError):
        read_shard_header(good_shard)


def test_token_beyond_vocab(tmp_path):
    path = tmp_path / "fineweb_val_000000.bin"
    write_shard(path, np.array([1, 5, 1023, 1024, 7], dtype=np.uint16))
    assert read_shard(path, vocab_size=1025).size == 5
    assert read_shard(path).size == 5  # no vocab given: no check
    with pytest.raises(DataError) as err:
        read_shard(path, vocab_size=1024)
    assert_one_line_naming(err, path)
    assert "1024" in str(err.value) and "position 3" in str(err.value)


def test_missing_and_unreadable_shards(tmp_path):
    with pytest.raises(DataError) as err:
        shard_paths(tmp_path, "train")
    assert_one_line_naming(err, tmp_path)
    assert "fineweb_train_" in str(err.value)

    missing = tmp_path / "fineweb_val_000000.bin"
    with pytest.raises(DataError) as err:
        read_shard(missing)
    assert_one_line_naming(err, missing)

    folder = tmp_path / "fineweb_train_000000.bin"  # matches the glob but cannot be opened as a file
    folder.mkdir()
    with pytest.raises(DataError) as err:
        load_split(tmp_path, "train", 1024)
    assert_one_line_naming(err, folder)


# ---------------------------------------------------------------- byte table

@pytest.fixture(scope="module")
def shared_encoded(shared_docs_path, shared_sp):
    """(texts, ids per text) of the whole fixture corpus under the challenge tokenizer."""
    texts = list(iter_docs(shared_docs_path))
    return texts, shared_sp.encode(texts, num_threads=THREADS)


def test_byte_table_matches_decoded_utf8_on_the_whole_corpus(shared_sp, shared_encoded):
    """The byte count of every <unk>-free document of the fixture corpus (tests/fixtures/docs_1mb.jsonl, the
    first 1,187 documents of the shared corpus) equals its sp.decode in UTF-8."""
    table = ByteTable.from_tokenizer(shared_sp, 1024)
    texts, encoded = shared_encoded
    assert len(texts) == 1187
    checked = mismatched = 0
    for ids in encoded:
        if UNK_ID in ids:  # <unk> counts 0 bytes but decodes to " ⁇ ": not comparable
            continue
        checked += 1
        counted = int(table.stream_bytes(np.array([BOS_ID, *ids])).sum())
        mismatched += counted != len(shared_sp.decode(ids).encode("utf-8"))
    # 178 of the 1,187 documents hold a character outside the vocabulary (-> <unk>), so 1,009 are
    # checkable (on the whole shared corpus: 12,315 of 14,499, all matching too)
    assert checked == 1009
    assert mismatched == 0


def reference_table(sp, size):
    """The challenge evaluator's rule, written out token by token."""
    base, space, boundary = [0] * size, [False] * size, [True] * size
    for tid in range(sp.vocab_size()):
        if sp.is_control(tid) or sp.is_unknown(tid) or sp.is_unused(tid):
            continue
        boundary[tid] = False
        if sp.is_byte(tid):
            base[tid] = 1
            continue
        piece = sp.id_to_piece(tid)
        space[tid] = piece[0] == "\u2581"
        base[tid] = len(piece[1:].encode("utf-8")) if space[tid] else len(piece.encode("utf-8"))
    return np.array(base), np.array(space), np.array(boundary)


def test_byte_table_token_by_token(shared_sp):
    for size in (1024, 1100):  # a model vocab larger than the tokenizer: extra ids count 0 bytes
        table = ByteTable.from_tokenizer(shared_sp, size)
        base, space, boundary = reference_table(shared_sp, size)
        np.testing.assert_array_equal(table.base_bytes, base)
        np.testing.assert_array_equal(table.has_leading_space, space)
        np.testing.assert_array_equal(table.is_boundary, boundary)
    assert table.is_boundary[[0, 1, 2, 3]].all() and not table.base_bytes[[0, 1, 2, 3]].any()
    assert table.is_boundary[1024:].all() and not table.base_bytes[1024:].any()
    assert space.sum() > 100 and (~space[:1024] & ~boundary[:1024]).sum() > 100  # both kinds exist

    spaced = shared_sp.piece_to_id("\u2581the")
    plain = shared_sp.piece_to_id("in")
    assert table.has_leading_space[spaced] and table.base_bytes[spaced] == 3
    assert not table.has_leading_space[plain] and table.base_bytes[plain] == 2
    # the space byte counts only after a non-boundary token
    prev = np.array([BOS_ID, 0, 2, UNK_ID, plain, spaced])
    np.testing.assert_array_equal(table.token_bytes(np.full(6, spaced), prev), [3, 3, 3, 3, 4, 4])
    np.testing.assert_array_equal(table.token_bytes(np.full(6, plain), prev), [2] * 6)
    # in a stream the first token's predecessor is a boundary
    np.testing.assert_array_equal(table.stream_bytes(np.array([spaced, spaced, BOS_ID, spaced, plain])),
                                  [3, 4, 0, 3, 2])
    assert table.stream_bytes(np.array([], dtype=np.int64)).size == 0
    ids = shared_sp.encode("Hello world, this is a test.")
    assert table.stream_bytes(np.array([BOS_ID, *ids])).sum() == len("Hello world, this is a test.")


# ---------------------------------------------------------------- prepare

def test_prepare_shared_corpus(prepared_data, shared_docs_path, shared_encoded):
    texts, encoded = shared_encoded
    stats = json.loads(shared_docs_path.with_suffix(".stats.json").read_text())  # counted independently
    manifest = json.loads((prepared_data / "manifest.json").read_text())
    assert manifest["vocab_size"] == 1024 and manifest["bos_id"] == BOS_ID
    assert manifest["val"]["docs"] == VAL_DOCS
    assert manifest["train"]["docs"] == len(texts) - VAL_DOCS == stats["num_docs"] - VAL_DOCS
    assert manifest["val"]["tokens"] + manifest["train"]["tokens"] == stats["tokens_with_bos_sp1024"]
    for split in ("val", "train"):
        paths = shard_paths(prepared_data, split)
        assert manifest[split]["shards"] == [p.name for p in paths]
        counts = [read_shard_header(p) for p in paths]
        assert sum(counts) == manifest[split]["tokens"]
        assert all(c == SHARD_TOKENS for c in counts[:-1]) and 0 < counts[-1] <= SHARD_TOKENS
        assert len(paths) == -(-manifest[split]["tokens"] // SHARD_TOKENS)
        assert len(paths) > 1  # both splits span several shards

    val = load_split(prepared_data, "val", 1024)
    train = load_split(prepared_data, "train", 1024)
    assert val[0] == BOS_ID and train[0] == BOS_ID
    assert (val == BOS_ID).sum() + (train == BOS_ID).sum() == len(texts)
    docs = [np.array([BOS_ID, *ids], dtype=np.uint16) for ids in encoded]
    np.testing.assert_array_equal(val, np.concatenate(docs[:VAL_DOCS]))  # the first docs, in order
    np.testing.assert_array_equal(train, np.concatenate(docs[VAL_DOCS:]))


WORDS = ("the quick brown fox jumps over lazy dog a cat sat on mat under warm sun while birds sing "
         "in tall green trees near river bank and children play with red ball every sunny morning "
         "people walk slowly through quiet streets of small town").split()


def synthetic_docs(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(count):
        # lower case only: character_coverage=0.999 would turn rare capitals into <unk>
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))) + "."
                     for _ in range(rng.randint(1, 3))]
        docs.append(" ".join(sentences))
    return docs


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def split_docs(stream: np.ndarray) -> list[np.ndarray]:
    starts = np.flatnonzero(stream == BOS_ID)
    assert starts.size and starts[0] == 0
    return np.split(stream, starts[1:])


def test_prepare_trains_a_tokenizer(tmp_path):
    texts = synthetic_docs(400)
    docs = write_jsonl(tmp_path / "docs.jsonl", texts)
    out = tmp_path / "data"
    manifest = prepare(docs, out, None, vocab_size=300, val_docs=40, shard_tokens=2000)
    model = out / "sp300_bpe.model"
    assert model.is_file()
    assert manifest["tokenizer"] == str(model.resolve())
    sp = load_tokenizer(model)
    assert sp.bos_id() == BOS_ID and 30 < sp.vocab_size() <= 300
    assert manifest["vocab_size"] == sp.vocab_size()
    assert manifest["val"]["docs"] == 40 and manifest["train"]["docs"] == 360
    assert len(manifest["train"]["shards"]) > 1  # small shards: documents span shard boundaries

    rows = split_docs(load_split(out, "val", sp.vocab_size())) + \
        split_docs(load_split(out, "train", sp.vocab_size()))
    assert len(rows) == len(texts)
    for text, row in zip(texts, rows):
        ids = row[1:].tolist()
        assert UNK_ID not in ids
        assert ids == sp.encode(text)
        assert sp.decode(ids) == sp.decode(sp.encode(text)) == text  # plain ASCII survives nmt_nfkc


def test_prepare_needs_more_docs_than_val(tmp_path, shared_tokenizer_path):
    docs = write_jsonl(tmp_path / "docs.jsonl", synthetic_docs(10))
    with pytest.raises(DataError) as err:
        prepare(docs, tmp_path / "out", shared_tokenizer_path, val_docs=10)
    assert_one_line_naming(err, docs)


# ---------------------------------------------------------------- iter_docs

def test_iter_docs_reports_file_and_line(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", ["a", "b\nc", ""])
    with open(good, "a") as f:
        f.write("\n   \n")  # blank lines are skipped
    assert list(iter_docs(good)) == ["a", "b\nc", ""]

    for line in ('{"text": "unterminated', '{"txt": "x"}', '["text"]', '{"text": 5}', "42"):
        path = tmp_path / "bad.jsonl"
        path.write_text('{"text": "fine"}\n\n' + line + "\n", encoding="utf-8")
        with pytest.raises(DataError) as err:
            list(iter_docs(path))
        assert_one_line_naming(err, f"{path}:3")

    with pytest.raises(DataError) as err:
        list(iter_docs(tmp_path / "nope.jsonl"))
    assert_one_line_naming(err, tmp_path / "nope.jsonl")


# ---------------------------------------------------------------- batch assembly

def docs_stream(lengths: list[int], lead: int = 0) -> np.ndarray:
    """BOS-led documents of the given lengths (after `lead` tokens of a headless document);
    every non-BOS token is unique (its position + 2), so a row identifies its window."""
    total = lead + sum(lengths)
    tokens = np.arange(2, total + 2, dtype=np.uint16)
    tokens[np.cumsum([lead, *lengths[:-1]])] = BOS_ID
    assert tokens.max() < PAD
    return tokens


def check_windows(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray, seq_len: int) -> None:
    """The docs layout: documents cut into consecutive seq_len windows, every token exactly once."""
    doc_starts = np.union1d([0], np.flatnonzero(tokens == BOS_ID))
    doc_ends = np.append(doc_starts[1:], tokens.size)
    # a partition of the stream, in order: nothing dropped, nothing repeated
    assert starts[0] == 0 and lengths.sum() == tokens.size
    np.testing.assert_array_equal(starts[1:], starts[:-1] + lengths[:-1])
    assert lengths.min() >= 1 and lengths.max() <= seq_len
    # every document boundary begins a window, so BOS only ever sits at a row's position 0
    assert np.isin(doc_starts, starts).all()
    doc = np.searchsorted(doc_starts, starts, side="right") - 1
    assert ((starts - doc_starts[doc]) % seq_len == 0).all()  # continuations at multiples of seq_len
    np.testing.assert_array_equal(lengths, np.minimum(seq_len, doc_ends[doc] - starts))
    assert doc_windows(tokens, seq_len)[0].size == (-(-(doc_ends - doc_starts) // seq_len)).sum()


def check_docs_rows(tokens: np.ndarray, rows: np.ndarray, seq_len: int) -> None:
    """Each row is one docs-layout window, then PAD to the end; BOS only at position 0."""
    assert rows.shape[1] == seq_len and rows.dtype == np.int64
    assert (rows[:, 1:] != BOS_ID).all()
    real = rows != PAD
    assert (real[:, :-1] >= real[:, 1:]).all()  # PAD only as a suffix
    starts, lengths = doc_windows(tokens, seq_len)
    for row, n in zip(rows, real.sum(1)):
        cand = starts[lengths == n]
        for k in range(min(n, 4)):
            cand = cand[tokens[cand + k] == row[k]]
        assert any(np.array_equal(tokens[s:s + n], row[:n]) for s in cand)


def test_doc_windows_and_copy_rows_synthetic():
    seq_len = 8
    lengths = [1, 3, 8, 9, 16, 17, 25, 2]
    tokens = docs_stream(lengths)
    starts, lens = doc_windows(tokens, seq_len)
    check_windows(tokens, starts, lens, seq_len)
    # the 25-token document: windows of 8, 8, 8, 1 at offsets 0, 8, 16, 24
    doc = sum(lengths[:6])
    pick = (starts >= doc) & (starts < doc + 25)
    assert (starts[pick] - doc).tolist() == [0, 8, 16, 24] and lens[pick].tolist() == [8, 8, 8, 1]
    assert lens.tolist() == [1, 3, 8, 8, 1, 8, 8, 8, 8, 1, 8, 8, 8, 1, 2]

    rows = copy_rows(tokens, starts, lens, seq_len, PAD)
    assert PAD == 1025
    for row, s, n in zip(rows, starts, lens):
        np.testing.assert_array_equal(row[:n], tokens[s:s + n])
        assert (row[n:] == PAD).all()
        assert (row[0] == BOS_ID) == (tokens[s] == BOS_ID)
    assert (rows[:, 1:] != BOS_ID).all()
    assert (rows[:, 0] == BOS_ID).sum() == len(lengths)

    headless = docs_stream([5, 4], lead=11)  # text before the first BOS is a document too
    assert headless[0] != BOS_ID
    check_windows(headless, *doc_windows(headless, seq_len), seq_len)
    assert doc_windows(headless, seq_len)[1].tolist() == [8, 3, 5, 4]


def test_doc_windows_on_the_shared_train_split(prepared_data):
    train = load_split(prepared_data, "train", 1024)
    for seq_len in (64, 2048):  # 2048: the long documentation pages get cut
        starts, lengths = doc_windows(train, seq_len)
        check_windows(train, starts, lengths, seq_len)
    assert (train[starts] != BOS_ID).sum() > 100  # continuation windows were exercised

    # all shards in one group, laid out in file order: the loader's windows are those of the whole split
    # (a document crossing into a shard of another group is cut there, by design; shards here are small)
    shards = len(shard_paths(prepared_data, "train"))
    loader = ShardedLoader(str(prepared_data / "fineweb_train_*.bin"), 2048, "docs", PAD, 1024, seed=0,
                           shards_per_group=shards)
    rows = np.concatenate([loader.next_rows(8) for _ in range(4)])
    loader.close()
    check_docs_rows(train, rows, 2048)
    assert (rows == PAD).any() and (rows[:, 0] != BOS_ID).any()


def test_prepare_rejects_bad_arguments_and_bad_utf8(tmp_path, shared_tokenizer_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError) as err:
        list(iter_docs(docs))
    assert_one_line_naming(err, f"{docs}:2")
    docs.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"}\n')
    for kwargs, what in (({"shard_tokens": 0}, "--shard-tokens"), ({"val_docs": 0}, "--val-docs")):
        with pytest.raises(DataError, match=what):
            prepare(docs, tmp_path / "out", shared_tokenizer_path, **{"val_docs": 1, **kwargs})
    assert not list((tmp_path).glob("out/*.bin"))
