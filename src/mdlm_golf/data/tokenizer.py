"""The SentencePiece tokenizer (load, or train with the challenge's settings) and the evaluator's byte table."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from ..config import BOS_ID
from .shards import DataError


def load_tokenizer(path: Path):
    """A SentencePieceProcessor for a .model file; a missing or bad file is a one-line DataError."""
    import sentencepiece as spm  # optional: only the stages that tokenize or count bytes need it

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: tokenizer model not found")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise DataError(f"{path}: not a SentencePiece model ({str(e).splitlines()[0]})") from None


def train_tokenizer(texts: Iterable[str], out_prefix: Path, vocab_size: int = 1024) -> Path:
    """Train a SentencePiece BPE with the challenge's settings; returns the .model path."""
    import sentencepiece as spm  # optional, as in load_tokenizer

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(out_prefix), model_type="bpe",
        vocab_size=vocab_size, character_coverage=0.999, byte_fallback=False,
        split_digits=True, normalization_rule_name="nmt_nfkc", add_dummy_prefix=False,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, hard_vocab_limit=False,
        max_sentence_length=1 << 20, num_threads=os.cpu_count() or 1, minloglevel=2,
    )
    return Path(f"{out_prefix}.model")


@dataclass(frozen=True)
class ByteTable:
    """The challenge evaluator's per-token byte rule, as lookup tables indexed by token id."""

    base_bytes: np.ndarray  # int64: UTF-8 bytes of the piece without its leading U+2581
    has_leading_space: np.ndarray  # bool: piece starts with U+2581 (one more byte ...)
    is_boundary: np.ndarray  # bool: ... unless the previous token is one of these

    @classmethod
    def from_tokenizer(cls, sp, vocab_size: int) -> "ByteTable":
        """The tables for a SentencePiece model, padded to vocab_size (ids past its pieces: 0 bytes)."""
        size = max(int(sp.vocab_size()), vocab_size)
        base = np.zeros(size, dtype=np.int64)
        space = np.zeros(size, dtype=bool)
        boundary = np.ones(size, dtype=bool)
        for tid in range(int(sp.vocab_size())):  # once per piece, not per token
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
