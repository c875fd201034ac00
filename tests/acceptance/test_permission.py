"""Acceptance battery, category "permission" (runner.py says how a case is judged)."""
from __future__ import annotations

from collections.abc import Callable

import pytest

from .mutators import chain, chmod, copy, files
from .runner import TINY, Case, Slot, fixed, slot_id


def permission_cases() -> list[Slot]:
    """No permission to write a folder or read a file (skipped as root, who has every permission)."""
    locked = files({"L": None})
    lock = chmod("L", 0o500)
    return fixed([
        Case("permission", "prepare --out in a read-only folder", ("prepare", "--docs", "{DOCS}", "--tokenizer",
                                                                   "{T}", "--out", "{C}/L/D", "--val-docs", "20"),
             names="{C}/L/D", setup=chain(locked, lock), nonroot=True),
        Case("permission", "train --out in a read-only folder", ("train", "--data", "{D}", "--out", "{C}/L/R",
                                                                 *TINY, "--steps", "1"),
             names="{C}/L/R", setup=chain(locked, lock), nonroot=True),
        Case("permission", "export --out in a read-only folder", ("export", "--run", "{R}", "--out",
                                                                  "{C}/L/A.bin"),
             names="{C}/L/A.bin", setup=chain(locked, lock), nonroot=True),
        Case("permission", "compress output in a read-only folder", ("compress", "--run", "{R}", "{TXT}",
                                                                     "{C}/L/x.mdz"),
             names="{C}/L/x.mdz", setup=chain(locked, lock), nonroot=True),
        Case("permission", "decompress output in a read-only folder", ("decompress", "--run", "{R}", "{M}",
                                                                       "{C}/L/x.txt"),
             names="{C}/L/x.txt", setup=chain(locked, lock), nonroot=True),
        Case("permission", "eval: unreadable model.pt", ("eval", "--run", "{C}/R", "--data", "{D}"),
             names="{C}/R/model.pt", setup=chain(copy("R"), chmod("R/model.pt", 0)), nonroot=True),
        Case("permission", "eval: unreadable val shard", ("eval", "--run", "{R}", "--data", "{C}/D"),
             names="{C}/D/fineweb_val_000000.bin",
             setup=chain(copy("D"), chmod("D/fineweb_val_000000.bin", 0)), nonroot=True),
        Case("permission", "compress: unreadable input", ("compress", "--run", "{R}", "{C}/in.txt",
                                                          "{C}/x.mdz"),
             names="{C}/in.txt", setup=chain(files({"in.txt": b"text"}), chmod("in.txt", 0)), nonroot=True),
        Case("permission", "prepare: unreadable docs", ("prepare", "--docs", "{C}/docs.jsonl", "--tokenizer", "{T}",
                                                        "--out", "{C}/D", "--val-docs", "20"),
             names="{C}/docs.jsonl", setup=chain(copy("docs.jsonl"), chmod("docs.jsonl", 0)), nonroot=True),
    ])


@pytest.mark.parametrize("slot", permission_cases(), ids=slot_id)
def test_permission(slot: Slot, run_slot: Callable[[Slot], None]) -> None:
    run_slot(slot)
