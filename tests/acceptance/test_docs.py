"""Acceptance battery, category "docs" (runner.py says how a case is judged)."""
from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from .mutators import chain, copy, exists, files
from .runner import CLEAN, OK, SEED, Case, Slot, fixed, slot_id


def docs_cases() -> list[Slot]:
    """prepare's input: malformed JSONL, non-UTF-8, too few documents, a used output folder."""
    prep = ("prepare", "--docs", "{C}/docs.jsonl", "--tokenizer", "{T}", "--out", "{C}/D", "--val-docs", "2")
    bad = {"not JSON": b'{"text": "a"}\n{"text": "b"}\nnot json at all\n{"text": "c"}\n',
           "no text field": b'{"text": "a"}\n{"body": "b"}\n{"text": "c"}\n',
           "text not a string": b'{"text": "a"}\n{"text": 5}\n{"text": "c"}\n',
           "a JSON array line": b'{"text": "a"}\n[1, 2]\n{"text": "c"}\n',
           "invalid UTF-8": b'{"text": "a"}\n{"text": "caf\xe9"}\n{"text": "c"}\n',
           "empty file": b"",
           "random binary": random.Random(SEED + 2).randbytes(4000),
           "two docs for --val-docs 2": b'{"text": "a"}\n{"text": "b"}\n'}
    cases = [Case("docs", f"prepare: {what}", prep, names="{C}/docs.jsonl", setup=files({"docs.jsonl": content}),
                  corrupt=True, pristine=True) for what, content in bad.items()]
    used = chain(files({"D/notes.txt": b"my notes\n"}), copy("docs.jsonl"))
    good = ("prepare", "--docs", "{C}/docs.jsonl", "--tokenizer", "{T}", "--out", "{C}/D", "--val-docs", "20")
    cases += [
        Case("docs", "prepare into a non-empty folder", good, names="--overwrite", setup=used),
        Case("docs", "prepare into a data folder, a bad flag and --overwrite", (*good, "--overwrite",
                                                                                "--shard-tokens", "0"),
             names="--shard-tokens", setup=chain(copy("docs.jsonl"), copy("D"))),
        Case("docs", "prepare into a data folder without --overwrite", good, names="--overwrite",
             setup=chain(copy("docs.jsonl"), copy("D"))),
        Case("docs", "prepare --overwrite keeps files that are not shards", (*good, "--overwrite"), expect=OK,
             setup=used, mutable=("D/manifest.json", "D/fineweb_"), check=exists("D/notes.txt", "D/manifest.json")),
        Case("docs", "prepare with blank lines between docs", good, expect=CLEAN,
             setup=files({"docs.jsonl": b'{"text": "a"}\n\n{"text": "b"}\n\n' * 15})),
    ]
    return fixed(cases)


@pytest.mark.parametrize("slot", docs_cases(), ids=slot_id)
def test_docs(slot: Slot, run_slot: Callable[[Slot], None]) -> None:
    run_slot(slot)
