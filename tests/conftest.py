"""Shared fixtures: the corpus and tokenizer in tests/fixtures (no ../shared needed), one prepared data folder
per session. The fixture names keep their shared_ prefix: the files are a slice and a copy of ../shared/data."""
from __future__ import annotations

import itertools
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"
# The first 1,187 documents (964 KB, whole lines) of the shared corpus docs_selected.jsonl: Python
# documentation pages and short quotations; docs_1mb.stats.json holds its counts, as the corpus' own does.
DOCS = FIXTURES / "docs_1mb.jsonl"
TOKENIZER = FIXTURES / "fineweb_1024_bpe.model"  # the challenge's SP-1024 tokenizer, copied byte for byte
# prepared_data's split: ~40k val tokens in 2 shards, ~343k train tokens in 12 (shard rotation is exercised)
VAL_DOCS = 100
SHARD_TOKENS = 30_000


def require_fixtures() -> None:
    for path in (DOCS, TOKENIZER):
        assert path.is_file(), f"test fixture {path} is missing from this checkout"


@pytest.fixture(scope="session")
def shared_tokenizer_path() -> Path:
    require_fixtures()
    return TOKENIZER


@pytest.fixture(scope="session")
def shared_docs_path() -> Path:
    require_fixtures()
    return DOCS


@pytest.fixture(scope="session")
def shared_sp(shared_tokenizer_path):
    from mdlm_golf.data import load_tokenizer

    return load_tokenizer(shared_tokenizer_path)


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory, shared_docs_path, shared_tokenizer_path) -> Path:
    """The fixture corpus as challenge shards: VAL_DOCS val docs, both splits in SHARD_TOKENS-token shards."""
    from mdlm_golf.data import prepare

    out = tmp_path_factory.mktemp("data")
    prepare(shared_docs_path, out, shared_tokenizer_path, val_docs=VAL_DOCS, shard_tokens=SHARD_TOKENS)
    return out


@pytest.fixture(scope="session", autouse=True)
def quiet_environment():
    """One torch thread (tiny models only lose to thread hand-offs, badly so on a busy machine), the
    CPU, and no stray config env vars (STEPS, SEED, LR ... would change what train builds)."""
    from mdlm_golf.config import field_types

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        for name in field_types():
            mp.delenv(name.upper(), raising=False)
        mp.setattr(torch.cuda, "is_available", lambda: False)  # CPU, as the subprocesses
        yield
    torch.set_num_threads(threads)


def first_docs(docs_path: Path, count: int, out: Path) -> Path:
    """The first `count` documents of a JSONL file, written to `out`."""
    with open(docs_path, encoding="utf-8") as f:
        lines = list(itertools.islice(f, count))
    assert len(lines) == count, f"{docs_path} holds {len(lines)} documents, not the {count} asked for"
    out.write_text("".join(lines), encoding="utf-8")
    return out


def small_data(root: Path, docs_path: Path, tokenizer: Path, docs: int, **prepare_args) -> Path:
    """A prepared data folder from the first `docs` documents of the fixture corpus."""
    from mdlm_golf.data import prepare

    prepare(first_docs(docs_path, docs, root / "docs.jsonl"), root / "D", tokenizer, **prepare_args)
    return root / "D"


def synthetic_byte_table(seed: int = 0, vocab: int = 1024):
    """Like a SentencePiece table: ids 0-3 are 0-byte boundaries, the rest 1-6 bytes, some with a space."""
    from mdlm_golf.data import ByteTable

    rng = np.random.default_rng(seed)
    base = rng.integers(1, 7, size=vocab).astype(np.int64)
    space = rng.random(vocab) < 0.4
    boundary = np.zeros(vocab, dtype=bool)
    base[:4], space[:4], boundary[:4] = 0, False, True
    return ByteTable(base, space, boundary)


def synthetic_val(n: int, p: np.ndarray, seed: int = 0, doc_len: int = 50) -> np.ndarray:
    """Tokens drawn from p (never BOS), with a BOS starting a document every ~doc_len tokens."""
    from mdlm_golf.config import BOS_ID

    rng = np.random.default_rng(seed)
    q = p.copy()
    q[BOS_ID] = 0.0
    tokens = rng.choice(p.size, size=n, p=q / q.sum())
    starts = np.cumsum(rng.integers(doc_len // 2, 2 * doc_len, size=n // 10))
    tokens[0] = BOS_ID
    tokens[starts[starts < n]] = BOS_ID
    return tokens.astype(np.uint16)


def zipf_unigram(seed: int = 0, vocab: int = 1024) -> np.ndarray:
    """A Zipf-like unigram distribution over the vocabulary, in a seeded random order."""
    rng = np.random.default_rng(seed)
    p = 1.0 / (np.arange(vocab) + 10.0) ** 1.1
    p = p[rng.permutation(vocab)]
    return p / p.sum()


class UnigramDenoiser(torch.nn.Module):
    """Fixed logits log p at every position, ignoring its input (large MASK/PAD logits SUBS must drop)."""

    def __init__(self, p: np.ndarray):
        super().__init__()
        vocab = p.size
        logits = torch.full((vocab + 2,), 10.0)
        logits[:vocab] = torch.from_numpy(np.log(p)).float()
        self.register_buffer("logits", logits)
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # evaluate() reads the device from a parameter

    def forward(self, x_t, sigma, clean=None, doc_ids=None):
        return self.logits.expand(*x_t.shape, -1)

    def nll_bits(self, ids: np.ndarray) -> np.ndarray:
        """The model's own code length per token, in float64 from its float32 logits (MASK/PAD dropped)."""
        log_p = torch.log_softmax(self.logits[: self.logits.numel() - 2].double(), dim=-1)
        return -log_p[torch.from_numpy(ids.astype(np.int64))].numpy() / math.log(2)


def clean_env() -> dict:
    """Environment for subprocess runs: one thread per process, CPU only, no stray config env vars."""
    from mdlm_golf.config import field_types

    env = {k: v for k, v in os.environ.items() if k.lower() not in field_types()}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env["OMP_NUM_THREADS"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU (gloo) even where a GPU is present
    return env
