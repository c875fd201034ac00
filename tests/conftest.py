"""Shared fixtures: the ../shared corpus and tokenizer, and one prepared data folder per session."""
from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DOCS = SHARED / "docs_selected.jsonl"
TOKENIZER = SHARED / "tokenizers" / "fineweb_1024_bpe.model"


def require_shared() -> None:
    if not (DOCS.is_file() and TOKENIZER.is_file()):
        pytest.skip(f"needs the shared corpus and tokenizer at {SHARED} (absent on this checkout)")


@pytest.fixture(scope="session")
def shared_tokenizer_path() -> Path:
    require_shared()
    return TOKENIZER


@pytest.fixture(scope="session")
def shared_docs_path() -> Path:
    require_shared()
    return DOCS


@pytest.fixture(scope="session")
def shared_sp(shared_tokenizer_path):
    from mdlm_golf.data import load_tokenizer

    return load_tokenizer(shared_tokenizer_path)


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory, shared_docs_path, shared_tokenizer_path) -> Path:
    """The shared corpus as challenge shards: 500 val docs, train split in 1M-token shards."""
    from mdlm_golf.data import prepare

    out = tmp_path_factory.mktemp("data")
    prepare(shared_docs_path, out, shared_tokenizer_path, val_docs=500, shard_tokens=1_000_000)
    return out
