"""Shard format, tokenizer byte table, corpus preparation and batch assembly."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..config import BOS_ID, MAX_VOCAB
from ..files import atomic_path, read_json_object, write_text_atomic

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_WORDS = 256
HEADER_BYTES = HEADER_WORDS * 4
MANIFEST_NAME = "manifest.json"
MIN_VOCAB = 5  # a tokenizer prepare trains needs pieces past its 4 special ids


class DataError(ValueError):
    """Bad input data; the message is one line that names the file."""


# ---------------------------------------------------------------- shard format

def write_shard(path: Path, tokens: np.ndarray) -> None:
    """Write one shard atomically: 256 int32 header words, then uint16 tokens."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(np.uint16).max):
        raise DataError(f"{path}: tokens do not fit in uint16")
    header = np.zeros(HEADER_WORDS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2", copy=False).tobytes())


def read_shard_header(path: Path) -> int:
    """Check a shard's header and size; return its token count."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise DataError(f"{path}: cannot read shard ({e.strerror})") from None
    if len(raw) < HEADER_BYTES:
        raise DataError(f"{path}: truncated header ({len(raw)} of {HEADER_BYTES} bytes)")
    magic, version, count = np.frombuffer(raw, dtype="<i4", count=3)
    if magic != SHARD_MAGIC:
        raise DataError(f"{path}: bad magic {magic} (expected {SHARD_MAGIC}); not a token shard")
    if version != SHARD_VERSION:
        raise DataError(f"{path}: unsupported shard version {version} (expected {SHARD_VERSION})")
    expected = HEADER_BYTES + 2 * int(count)
    if size != expected:
        raise DataError(f"{path}: header declares {count} tokens ({expected} bytes) "
                        f"but the file has {size} bytes")
    return int(count)


def read_shard(path: Path, vocab_size: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Read and validate one shard, optionally straight into a pre-allocated uint16 buffer."""
    count = read_shard_header(path)
    if out is None:
        out = np.empty(count, dtype=np.uint16)
    elif out.size != count:
        raise DataError(f"{path}: buffer holds {out.size} tokens, shard has {count}")
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        if f.readinto(memoryview(out).cast("B")) != 2 * count:
            raise DataError(f"{path}: file shrank while reading")
    if vocab_size is not None and count and int(out.max()) >= vocab_size:
        bad = int(np.argmax(out >= vocab_size))
        raise DataError(f"{path}: token {int(out[bad])} at position {bad} is >= vocab size {vocab_size}")
    return out


def read_manifest(data_dir: Path) -> dict | None:
    """DIR/manifest.json (written by prepare), or None where there is none; bad JSON is a one-line error."""
    return read_json_object(Path(data_dir) / MANIFEST_NAME, DataError, "a JSON manifest")


def shard_paths(data_dir: Path, split: str) -> list[Path]:
    """The split's shards in order: those DIR/manifest.json lists, so stray old shards are never read;
    without a manifest (the challenge's downloaded layout) every fineweb_{split}_*.bin, sorted."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    if manifest is not None:
        return listed_shards(manifest, data_dir, split)
    paths = sorted(data_dir.glob(f"fineweb_{split}_*.bin"))
    if not paths:
        raise DataError(f"{data_dir}: no fineweb_{split}_*.bin shards found")
    return paths


def listed_shards(manifest: dict, data_dir: Path, split: str) -> list[Path]:
    """The manifest's split -> shards list as paths in DIR; a missing or malformed entry names the file."""
    where = Path(data_dir) / MANIFEST_NAME
    entry = manifest.get(split)
    names = entry.get("shards") if isinstance(entry, dict) else None
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise DataError(f"{where}: no list of {split} shards (expected \"{split}\": {{\"shards\": [...]}})")
    if any(Path(n).name != n or n in (".", "..") for n in names):  # a shard lives in DIR itself
        raise DataError(f"{where}: {split} shard names must be plain file names, got {names[:3]}")
    paths = [Path(data_dir) / n for n in names]
    missing = next((p for p in paths if not p.exists()), None)
    if missing is not None:
        raise DataError(f"{missing}: listed in {where} but missing")
    return paths


def load_split(data_dir: Path, split: str, vocab_size: int) -> np.ndarray:
    """All tokens of a split, concatenated into one pre-sized array (no 2x peak)."""
    paths = shard_paths(data_dir, split)
    counts = [read_shard_header(p) for p in paths]
    if not sum(counts):
        raise DataError(f"{paths[0] if len(paths) == 1 else data_dir}: the {split} split holds no tokens")
    tokens = np.empty(sum(counts), dtype=np.uint16)
    offset = 0
    for path, count in zip(paths, counts):
        read_shard(path, vocab_size, out=tokens[offset:offset + count])
        offset += count
    return tokens


# ---------------------------------------------------------------- tokenizer and bytes

def load_tokenizer(path: Path):
    import sentencepiece as spm

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: tokenizer model not found")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise DataError(f"{path}: not a SentencePiece model ({str(e).splitlines()[0]})") from None


@dataclass(frozen=True)
class ByteTable:
    """The challenge evaluator's per-token byte rule, as lookup tables indexed by token id."""

    base_bytes: np.ndarray  # int64: UTF-8 bytes of the piece without its leading U+2581
    has_leading_space: np.ndarray  # bool: piece starts with U+2581 (one more byte ...)
    is_boundary: np.ndarray  # bool: ... unless the previous token is one of these

    @classmethod
    def from_tokenizer(cls, sp, vocab_size: int) -> "ByteTable":
        size = max(int(sp.vocab_size()), vocab_size)
        base = np.zeros(size, dtype=np.int64)
        space = np.zeros(size, dtype=bool)
        boundary = np.ones(size, dtype=bool)
        for tid in range(int(sp.vocab_size())):
            if sp.is_control(tid) or sp.is_unknown(tid) or sp.is_unused(tid):
                continue  # 0 bytes and a boundary
            boundary[tid] = False
            if sp.is_byte(tid):
                base[tid] = 1
                continue
            piece = sp.id_to_piece(tid)
            if piece.startswith("\u2581"):
                space[tid] = True
                piece = piece[1:]
            base[tid] = len(piece.encode("utf-8"))
        return cls(base, space, boundary)

    def token_bytes(self, tokens: np.ndarray, prev: np.ndarray) -> np.ndarray:
        """Bytes each token stands for, given the token before it (vectorized)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        prev = np.asarray(prev, dtype=np.int64)
        return self.base_bytes[tokens] + (self.has_leading_space[tokens] & ~self.is_boundary[prev])

    def stream_bytes(self, stream: np.ndarray) -> np.ndarray:
        """Per-token bytes of a contiguous stream; the first token's predecessor counts as a boundary."""
        stream = np.asarray(stream, dtype=np.int64)
        prev = np.concatenate([[BOS_ID], stream[:-1]]) if stream.size else stream
        return self.token_bytes(stream, prev)


# ---------------------------------------------------------------- corpus preparation

def iter_docs(path: Path) -> Iterator[str]:
    """Texts of a {"text": ...} JSONL file; a bad line is an error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: documents file not found")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{path}:{lineno}: expected a JSON object with a \"text\" field") from None
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: \"text\" is not a string")
            yield text


def train_tokenizer(texts: Iterable[str], out_prefix: Path, vocab_size: int = 1024) -> Path:
    """Train a SentencePiece BPE with the challenge's settings; returns the .model path."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(out_prefix), model_type="bpe",
        vocab_size=vocab_size, character_coverage=0.999, byte_fallback=False,
        split_digits=True, normalization_rule_name="nmt_nfkc", add_dummy_prefix=False,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, hard_vocab_limit=False,
        max_sentence_length=1 << 20, num_threads=os.cpu_count() or 1, minloglevel=2,
    )
    return Path(f"{out_prefix}.model")


def tokenize_docs(sp, texts: list[str], batch_docs: int = 1024) -> Iterator[np.ndarray]:
    """BOS + ids for each document, encoded in multi-threaded batches."""
    threads = os.cpu_count() or 1
    for i in range(0, len(texts), batch_docs):
        for ids in sp.encode(texts[i:i + batch_docs], num_threads=threads):
            yield np.asarray([BOS_ID, *ids], dtype=np.uint16)


class ShardWriter:
    """Accumulates document tokens and writes fixed-size shards fineweb_{split}_NNNNNN.bin."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split, self.shard_tokens = Path(out_dir), split, shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.paths: list[Path] = []
        self.tokens = 0
        self.docs = 0

    def add(self, doc: np.ndarray) -> None:
        self.pending.append(doc)
        self.pending_tokens += doc.size
        self.docs += 1
        while self.pending_tokens >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def close(self) -> None:
        if self.pending_tokens:
            self._flush(self.pending_tokens)

    def _flush(self, count: int) -> None:
        joined = np.concatenate(self.pending)
        path = self.out_dir / f"fineweb_{self.split}_{len(self.paths):06d}.bin"
        write_shard(path, joined[:count])
        self.paths.append(path)
        self.tokens += count
        rest = joined[count:]
        self.pending = [rest] if rest.size else []
        self.pending_tokens = rest.size


def clear_data_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a folder that holds anything, unless overwrite: then its manifest and old shards go first."""
    if not out_dir.is_dir():
        return  # absent: prepare makes it (a file in the way fails there, naming it)
    if overwrite:
        for path in [out_dir / MANIFEST_NAME, *sorted(out_dir.glob("fineweb_*.bin"))]:  # manifest first
            path.unlink(missing_ok=True)
    elif any(out_dir.iterdir()):
        raise DataError(f"{out_dir}: not empty; prepare into a new or empty folder, or pass --overwrite "
                        f"to replace its shards and manifest")


def prepare(docs_path: Path, out_dir: Path, tokenizer_path: Path | None = None,
            vocab_size: int = 1024, val_docs: int = 500, shard_tokens: int = 100_000_000,
            *, overwrite: bool = False) -> dict:
    """Tokenize a docs JSONL into val/train shards plus manifest.json in an empty (or, with overwrite,
    a cleared) folder; returns the manifest."""
    if shard_tokens < 1:
        raise DataError(f"{docs_path}: --shard-tokens must be >= 1, got {shard_tokens}")
    if val_docs < 1:
        raise DataError(f"{docs_path}: --val-docs must be >= 1 (evaluation needs a val split), got {val_docs}")
    if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise DataError(f"{docs_path}: --vocab-size must be in [{MIN_VOCAB}, {MAX_VOCAB}], got {vocab_size}")
    out_dir = Path(out_dir)
    clear_data_dir(out_dir, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = list(iter_docs(docs_path))
    if len(texts) <= val_docs:
        raise DataError(f"{docs_path}: {len(texts)} documents, need more than --val-docs {val_docs}")
    if tokenizer_path is None:
        try:
            tokenizer_path = train_tokenizer(texts, out_dir / f"sp{vocab_size}_bpe", vocab_size)
        except RuntimeError as e:  # e.g. fewer pieces than the corpus has characters
            raise DataError(f"{docs_path}: cannot train a {vocab_size}-piece tokenizer on it "
                            f"({str(e).splitlines()[0]})") from None
    sp = load_tokenizer(tokenizer_path)
    if sp.bos_id() != BOS_ID:
        raise DataError(f"{tokenizer_path}: bos id is {sp.bos_id()}, shards need {BOS_ID}")
    writers = {"val": ShardWriter(out_dir, "val", shard_tokens),
               "train": ShardWriter(out_dir, "train", shard_tokens)}
    for i, doc in enumerate(tokenize_docs(sp, texts)):
        writers["val" if i < val_docs else "train"].add(doc)
    manifest = {"docs_source": str(docs_path), "tokenizer": str(Path(tokenizer_path).resolve()),
                "vocab_size": int(sp.vocab_size()), "bos_id": BOS_ID, "shard_tokens": shard_tokens}
    for split, w in writers.items():
        w.close()
        manifest[split] = {"docs": w.docs, "tokens": w.tokens, "shards": [p.name for p in w.paths]}
    write_text_atomic(out_dir / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    return manifest


# ---------------------------------------------------------------- batch assembly

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
