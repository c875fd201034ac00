"""Acceptance battery, category "checkpoint" (runner.py says how a case is judged)."""
from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from .mutators import (CKPT_SEAL, checkpoint, config_with, const, cut, flip, non_finite, poisoned, poisoned_weight,
                       run_file, state_with)
from .runner import SEED, Case, Ctx, Slot, fixed, slot_id

EVAL = ("eval", "--run", "{C}/R", "--data", "{D}", "--num-seqs", "2", "--elbo-steps", "2")
SAMPLE = ("sample", "--run", "{C}/R", "--length", "8", "--steps", "2")
EXPORT = ("export", "--run", "{C}/R", "--out", "{C}/A.bin")
COMPRESS = ("compress", "--run", "{C}/R", "{TXT}", "{C}/x.mdz")
READERS = [("eval", EVAL), ("sample", SAMPLE), ("export", EXPORT), ("compress", COMPRESS)]
RESUME = ("train", "--resume", "{C}/R", "--data", "{D}", "--no-eval")
MODEL, CKPT = "{C}/R/model.pt", "{C}/R/checkpoint.pt"
ANY_SIZE = 1 << 20  # flip_offsets' labels do not depend on the size: any size lists them before R is built


def flip_offsets(size: int) -> dict[str, int]:
    """Where the model.pt flips land, by what they hit: zip entries, data, the end records, the seal."""
    rng = random.Random(SEED + 3)
    comment = len(CKPT_SEAL) + 64  # the seal: the zip comment, after its 2-byte length
    seeded = sorted(rng.randrange(100, size - 200) for _ in range(5))
    return {"byte 0": 0, "byte 1": 1, "byte 3": 3, "byte 40": 40,
            **{f"seeded byte {k}": offset for k, offset in enumerate(seeded, 1)},
            "end records": size - comment - 30, "comment length": size - comment - 2, "seal": size - comment + 5,
            "last byte": size - 1}


def flip_slot(index: int, where: str) -> Slot:
    """model.pt with bit index % 8 flipped at `where`, read by the four readers in turn."""
    bit, (reader, argv) = index % 8, READERS[index % 4]

    def make(ctx: Ctx) -> Case:
        offset = flip_offsets(ctx.path("R/model.pt").stat().st_size)[where]
        return Case("checkpoint", f"model.pt bit {bit} flipped at byte {offset} ({reader})", argv, names=MODEL,
                    setup=run_file("model.pt", flip(offset, bit)), corrupt=True)
    return Slot(f"model.pt bit {bit} flipped at {where} ({reader})", make)


def crafted_cases() -> list[Case]:
    """Random bytes, truncations, code-running pickles, NaN weights, crafted states. (checkpoint.pt is cut and
    flipped at its copy's length, which is the built file's.)"""
    return [
        Case("checkpoint", "model.pt random bytes", EVAL, names=MODEL,
             setup=run_file("model.pt", const(random.Random(SEED + 4).randbytes(5000))), corrupt=True),
        Case("checkpoint", "model.pt empty", SAMPLE, names=MODEL, setup=run_file("model.pt", const(b"")),
             corrupt=True),
        Case("checkpoint", "model.pt truncated to half", EVAL, names=MODEL,
             setup=run_file("model.pt", lambda d: d[:len(d) // 2]), corrupt=True),
        Case("checkpoint", "model.pt without its last byte", EXPORT, names=MODEL,
             setup=run_file("model.pt", cut(-1)), corrupt=True),
        Case("checkpoint", "model.pt is JSON", COMPRESS, names=MODEL,
             setup=run_file("model.pt", const(b'{"format": "mdlm-golf-checkpoint-v1"}')), corrupt=True),
        Case("checkpoint", "checkpoint.pt bit flipped (resume)", RESUME, names=CKPT,
             setup=run_file("checkpoint.pt", lambda d: flip(len(d) // 3, 5)(d)), corrupt=True),
        Case("checkpoint", "checkpoint.pt truncated (resume)", RESUME, names=CKPT,
             setup=run_file("checkpoint.pt", lambda d: d[:len(d) // 2]), corrupt=True),
        Case("checkpoint", "code-running pickle, sealed (eval)", EVAL, names=MODEL, marker=True,
             setup=checkpoint("model.pt", poisoned), corrupt=True),
        Case("checkpoint", "code-running pickle as a weight, sealed (compress)", COMPRESS, names=MODEL,
             marker=True, setup=checkpoint("model.pt", poisoned_weight), corrupt=True),
        Case("checkpoint", "code-running pickle, unsealed (sample)", SAMPLE, names=MODEL, marker=True,
             setup=checkpoint("model.pt", poisoned, sealed=False), corrupt=True),
        Case("checkpoint", "code-running old-style pickle (export)", EXPORT, names=MODEL, marker=True,
             setup=checkpoint("model.pt", poisoned, legacy=True), corrupt=True),
        Case("checkpoint", "code-running pickle in checkpoint.pt (resume)", RESUME, names=CKPT, marker=True,
             setup=checkpoint("checkpoint.pt", poisoned), corrupt=True),
        Case("checkpoint", "NaN weight, sealed (eval)", EVAL, names=MODEL,
             setup=checkpoint("model.pt", non_finite(float("nan"))), corrupt=True),
        Case("checkpoint", "inf weight, sealed (export)", EXPORT, names=MODEL,
             setup=checkpoint("model.pt", non_finite(float("inf"))), corrupt=True),
        Case("checkpoint", "NaN weight in checkpoint.pt (resume)", RESUME, names=CKPT,
             setup=checkpoint("checkpoint.pt", non_finite(float("nan"))), corrupt=True),
        Case("checkpoint", "NaN weight, sealed (sample)", SAMPLE, names=MODEL,
             setup=checkpoint("model.pt", non_finite(float("nan"))), corrupt=True),
        Case("checkpoint", "sealed, wrong format tag", EVAL, names=MODEL,
             setup=checkpoint("model.pt", state_with(format="something-else")), corrupt=True),
        Case("checkpoint", "sealed, model is a list", EVAL, names=MODEL,
             setup=checkpoint("model.pt", state_with(model=[1, 2, 3])), corrupt=True),
        Case("checkpoint", "sealed, a list instead of a dict", SAMPLE, names=MODEL,
             setup=checkpoint("model.pt", lambda s, c: [1, 2, 3]), corrupt=True),
        Case("checkpoint", "sealed, config says 3 layers", EVAL, names=MODEL,
             setup=checkpoint("model.pt", config_with(num_layers=3)), corrupt=True),
        Case("checkpoint", "sealed, config steps -1", SAMPLE, names=MODEL,
             setup=checkpoint("model.pt", config_with(steps=-1)), corrupt=True),
        Case("checkpoint", "sealed, config is a string", EXPORT, names=MODEL,
             setup=checkpoint("model.pt", state_with(config="oops")), corrupt=True),
        Case("checkpoint", "sealed, config has an unknown field", EVAL, names=MODEL,
             setup=checkpoint("model.pt", config_with(bogus_field=1)), corrupt=True),
        Case("checkpoint", "a torch zip without the seal", EVAL, names=MODEL,
             setup=checkpoint("model.pt", lambda s, c: s, sealed=False), corrupt=True),
    ]


def checkpoint_cases() -> list[Slot]:
    """Random bytes, truncation, flipped bits at several offsets, code-running pickles, NaN weights, crafted
    states: every one refused with one line naming the file, and no code run."""
    flips = [flip_slot(index, where) for index, where in enumerate(flip_offsets(ANY_SIZE))]
    return [*flips, *fixed(crafted_cases())]


@pytest.mark.parametrize("slot", checkpoint_cases(), ids=slot_id)
def test_checkpoint(slot: Slot, run_slot: Callable[[Slot], None]) -> None:
    run_slot(slot)
