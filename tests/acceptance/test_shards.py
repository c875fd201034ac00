"""Acceptance battery, category "shards" (runner.py says how a case is judged)."""
from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from .mutators import chain, const, copy, count_delta, cut, files, header_word, no_tokens, shards, token_at
from .runner import CLEAN, OK, SEED, TINY, Case, Slot, fixed, slot_id


def shard_cases() -> list[Slot]:
    """Damaged shards: every reader checks magic, version, size, token range; one line naming the shard."""
    val = ("eval", "--run", "{R}", "--data", "{C}/D", "--num-seqs", "2", "--elbo-steps", "2")
    train = ("train", "--data", "{C}/D", "--out", "{C}/R", *TINY, "--steps", "2", "--no-eval")
    first_val, first_train = "{C}/D/fineweb_val_000000.bin", "{C}/D/fineweb_train_"
    damage = [("bad magic", header_word(0, 12345)), ("bad version", header_word(1, 7)),
              ("truncated to half", lambda d: d[:len(d) // 2 + 1]), ("truncated header", cut(100)),
              ("empty file", const(b"")), ("count says more", count_delta(10)),
              ("count says fewer", count_delta(-10)), ("negative count", header_word(2, -1)),
              ("token id 65535", token_at(5, 65535)), ("token id = vocab 1024", token_at(7, 1024)),
              ("random bytes", const(random.Random(SEED).randbytes(5000)))]
    cases = [Case("shards", f"val shard: {what}", val, names=first_val, setup=shards("val", fn), corrupt=True)
             for what, fn in damage]
    cases += [Case("shards", "one of two val shards: 0 tokens (the format allows it)", val, expect=CLEAN,
                   setup=shards("val", no_tokens)),
              Case("shards", "val split: every shard 0 tokens", val, names="{C}/D",
                   setup=shards("val", no_tokens, every=True), corrupt=True)]
    cases += [Case("shards", f"train shards: {what}", train, names=first_train,
                   setup=shards("train", fn, every=True), corrupt=True)
              for what, fn in damage if what in ("bad magic", "bad version", "truncated to half", "count says more",
                                                 "token id 65535", "random bytes")]
    cases += [Case("shards", "train shards: all 0 tokens", train, names="{C}/D",
                   setup=shards("train", no_tokens, every=True), corrupt=True),
              Case("shards", "a stray garbage shard not in the manifest", val, expect=OK,
                   setup=chain(copy("D"), files({"D/fineweb_val_999999.bin": b"garbage" * 200})))]
    return fixed(cases)


@pytest.mark.parametrize("slot", shard_cases(), ids=slot_id)
def test_shards(slot: Slot, run_slot: Callable[[Slot], None]) -> None:
    run_slot(slot)
