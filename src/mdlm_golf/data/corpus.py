"""Corpus preparation: a {"text": ...} JSONL of documents -> val/train shards plus manifest.json.

(Named corpus, not prepare: the package exports the function `prepare`, which would shadow a submodule.)
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from ..config import BOS_ID, MAX_VOCAB
from ..files import staged_folder
from .shards import MANIFEST_NAME, DataError, write_manifest, write_shard
from .tokenizer import load_tokenizer, train_tokenizer

MIN_VOCAB = 5  # a tokenizer prepare trains needs pieces past its 4 special ids


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
        """Queue one document; write every full shard it completes."""
        self.pending.append(doc)
        self.pending_tokens += doc.size
        self.docs += 1
        while self.pending_tokens >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def close(self) -> None:
        """Write what is left as a last, shorter shard."""
        if self.pending_tokens:
            self._flush(self.pending_tokens)

    def summary(self) -> dict:
        """The split's manifest entry."""
        return {"docs": self.docs, "tokens": self.tokens, "shards": [p.name for p in self.paths]}

    def _flush(self, count: int) -> None:
        joined = np.concatenate(self.pending)
        path = self.out_dir / f"fineweb_{self.split}_{len(self.paths):06d}.bin"
        write_shard(path, joined[:count])
        self.paths.append(path)
        self.tokens += count
        rest = joined[count:]
        self.pending = [rest] if rest.size else []
        self.pending_tokens = rest.size


def check_data_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a folder that holds anything, unless overwrite (clear_old_shards then removes its shards
    and manifest, but only once the docs and tokenizer have been read: bad input never costs them)."""
    if out_dir.is_dir() and not overwrite and any(out_dir.iterdir()):
        raise DataError(f"{out_dir}: not empty; prepare into a new or empty folder, or pass --overwrite "
                        f"to replace its shards and manifest")


def clear_old_shards(out_dir: Path) -> None:
    """Remove the manifest and old shards (manifest first: a folder with a manifest has all its shards)."""
    for path in [out_dir / MANIFEST_NAME, *sorted(out_dir.glob("fineweb_*.bin"))]:
        path.unlink(missing_ok=True)


def check_prepare_args(docs_path: Path, vocab_size: int, val_docs: int, shard_tokens: int) -> None:
    """One-line errors for prepare's numeric flags, before any file is touched."""
    if shard_tokens < 1:
        raise DataError(f"{docs_path}: --shard-tokens must be >= 1, got {shard_tokens}")
    if val_docs < 1:
        raise DataError(f"{docs_path}: --val-docs must be >= 1 (evaluation needs a val split), got {val_docs}")
    if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise DataError(f"{docs_path}: --vocab-size must be in [{MIN_VOCAB}, {MAX_VOCAB}], got {vocab_size}")


def corpus_tokenizer(texts: list[str], docs_path: Path, out_dir: Path, tokenizer_path: Path | None,
                     vocab_size: int):
    """(the tokenizer, its path): the given one, or one trained on the corpus into out_dir."""
    if tokenizer_path is None:
        try:
            tokenizer_path = train_tokenizer(texts, out_dir / f"sp{vocab_size}_bpe", vocab_size)
        except RuntimeError as e:  # e.g. fewer pieces than the corpus has characters
            raise DataError(f"{docs_path}: cannot train a {vocab_size}-piece tokenizer on it "
                            f"({str(e).splitlines()[0]})") from None
    sp = load_tokenizer(tokenizer_path)
    if sp.bos_id() != BOS_ID:
        raise DataError(f"{tokenizer_path}: bos id is {sp.bos_id()}, shards need {BOS_ID}")
    return sp, Path(tokenizer_path)


def prepare(docs_path: Path, out_dir: Path, tokenizer_path: Path | None = None,
            vocab_size: int = 1024, val_docs: int = 500, shard_tokens: int = 100_000_000,
            *, overwrite: bool = False) -> dict:
    """Tokenize a docs JSONL into val/train shards plus manifest.json in an empty folder (or, with
    overwrite, one whose old shards and manifest are replaced once the new ones are whole); returns the
    manifest."""
    check_prepare_args(docs_path, vocab_size, val_docs, shard_tokens)
    out_dir = Path(out_dir)
    check_data_dir(out_dir, overwrite)
    texts = list(iter_docs(docs_path))
    if len(texts) <= val_docs:
        raise DataError(f"{docs_path}: {len(texts)} documents, need more than --val-docs {val_docs}")
    out_dir.mkdir(parents=True, exist_ok=True)  # a file in the way fails here, naming it
    with staged_folder(out_dir) as stage:  # a full disk mid-write costs nothing: the old shards stay
        sp, trained_path = corpus_tokenizer(texts, docs_path, stage, tokenizer_path, vocab_size)
        final_tokenizer = out_dir / trained_path.name if tokenizer_path is None else trained_path
        manifest = write_splits(sp, texts, val_docs, stage, shard_tokens)
        manifest = {"docs_source": str(docs_path), "tokenizer": str(final_tokenizer.resolve()), **manifest}
        write_manifest(stage, manifest)
        clear_old_shards(out_dir)  # the new version is whole: only now may the old one go
        for path in sorted(stage.iterdir(), key=lambda p: p.name == MANIFEST_NAME):  # the manifest last
            os.replace(path, out_dir / path.name)
    return manifest


def write_splits(sp, texts: list[str], val_docs: int, out_dir: Path, shard_tokens: int) -> dict:
    """Write the val split (the first val_docs documents) and the train split as shards; their manifest
    entries (no manifest written)."""
    writers = {"val": ShardWriter(out_dir, "val", shard_tokens),
               "train": ShardWriter(out_dir, "train", shard_tokens)}
    for i, doc in enumerate(tokenize_docs(sp, texts)):
        writers["val" if i < val_docs else "train"].add(doc)
    manifest = {"vocab_size": int(sp.vocab_size()), "bos_id": BOS_ID, "shard_tokens": shard_tokens}
    for split, writer in writers.items():
        writer.close()
        manifest[split] = writer.summary()
    return manifest
