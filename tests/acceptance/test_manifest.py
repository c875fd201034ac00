"""Acceptance battery, category "manifest" (runner.py says how a case is judged)."""
from __future__ import annotations

import json
import random
from collections.abc import Callable

import pytest

from .mutators import chain, const, copy, edit, files, manifest, unlink
from .runner import SEED, TINY, Case, Slot, fixed, slot_id


def manifest_cases() -> list[Slot]:
    """manifest.json not JSON, incomplete, pointing at missing or foreign files."""
    train = ("train", "--data", "{C}/D", "--out", "{C}/R", *TINY, "--steps", "1", "--no-eval")
    val = ("eval", "--run", "{R}", "--data", "{C}/D", "--num-seqs", "2", "--elbo-steps", "2")
    junk_model = files({"junk.model": random.Random(SEED + 1).randbytes(3000)})
    return fixed([
        Case("manifest", "not JSON", train, names="{C}/D/manifest.json", setup=manifest(lambda m: "{not json")),
        Case("manifest", "empty file", train, names="{C}/D/manifest.json", setup=manifest(lambda m: "")),
        Case("manifest", "a JSON array", train, names="{C}/D/manifest.json", setup=manifest(lambda m: "[1, 2]")),
        Case("manifest", "binary junk", train, names="{C}/D/manifest.json",
             setup=chain(copy("D"), edit("D/manifest.json", const(b"\xff\xfe\x00junk")))),
        Case("manifest", "no tokenizer", train, names="tokenizer",
             setup=manifest(lambda m: json.dumps({k: v for k, v in m.items() if k != "tokenizer"}))),
        Case("manifest", "tokenizer not found", train, names="{C}/nope.model",
             setup=manifest(lambda m: json.dumps({**m, "tokenizer": "{C}/nope.model"}))),
        Case("manifest", "tokenizer is random bytes", train, names="{C}/junk.model",
             setup=chain(junk_model, manifest(lambda m: json.dumps({**m, "tokenizer": "{C}/junk.model"})))),
        Case("manifest", "--tokenizer is random bytes", ("train", "--data", "{D}", "--tokenizer", "{C}/junk.model",
                                                         "--out", "{C}/R", *TINY, "--steps", "1", "--no-eval"),
             names="{C}/junk.model", setup=junk_model),
        Case("manifest", "listed train shard missing", train, names="{C}/D/fineweb_train_000001.bin",
             setup=chain(copy("D"), unlink("D/fineweb_train_000001.bin"))),
        Case("manifest", "listed val shard missing", val, names="{C}/D/fineweb_val_000001.bin",
             setup=chain(copy("D"), unlink("D/fineweb_val_000001.bin"))),
        Case("manifest", "shard list not a list", val, names="{C}/D/manifest.json",
             setup=manifest(lambda m: json.dumps({**m, "val": {"shards": "fineweb_val_000000.bin"}}))),
        Case("manifest", "shard name escapes the folder", val, names="{C}/D/manifest.json",
             setup=manifest(lambda m: json.dumps({**m, "val": {"shards": ["../../etc/passwd"]}}))),
        Case("manifest", "empty val list", val, names="{C}/D",
             setup=manifest(lambda m: json.dumps({**m, "val": {"shards": []}}))),
        Case("manifest", "no manifest: train needs --tokenizer", train, names="manifest.json",
             setup=chain(copy("D"), unlink("D/manifest.json"))),
    ])


@pytest.mark.parametrize("slot", manifest_cases(), ids=slot_id)
def test_manifest(slot: Slot, run_slot: Callable[[Slot], None]) -> None:
    run_slot(slot)
