"""Acceptance battery, category "artifact" (runner.py says how a case is judged)."""
from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from .mutators import ART_HEADER, artifact, chain, copy, cut, edit, files, flip, meta_config, meta_with
from .runner import SEED, Case, Ctx, Slot, fixed, slot_id

EVAL = ("eval", "--artifact", "{C}/A.bin", "--data", "{D}", "--num-seqs", "2", "--elbo-steps", "2")
SAMPLE = ("sample", "--artifact", "{C}/A.bin", "--length", "8", "--steps", "2")
SUBMISSION = ("submission", "--run", "{R}", "--artifact", "{C}/A.bin", "--data", "{D}", "--out", "{C}/S", "--name",
              "x", "--github-id", "y", "--num-seqs", "2", "--elbo-steps", "2")
READERS = [("eval", EVAL), ("sample", SAMPLE), ("submission", SUBMISSION)]
ART = "{C}/A.bin"
ANY_SIZE, ANY_META = 1 << 16, 1 << 10  # the labels below do not depend on the sizes: any sizes list them


def layout(ctx: Ctx) -> tuple[int, int]:
    """The built A.bin's size and metadata length: where its flips and cuts land."""
    data = ctx.path("A.bin").read_bytes()
    return len(data), ART_HEADER.unpack_from(data)[2]


def flip_offsets(size: int, meta_len: int) -> dict[str, int]:
    """Header fields, the metadata's ends and middle, the payload (four seeded bytes), the CRC."""
    payload_start = ART_HEADER.size + meta_len
    rng = random.Random(SEED + 5)
    return {"magic": 0, "version": 8, "metadata length": 10, "metadata start": ART_HEADER.size,
            "metadata middle": ART_HEADER.size + meta_len // 2, "metadata end": payload_start - 1,
            "payload start": payload_start, **{f"payload {i}": rng.randrange(payload_start + 1, size - 5)
                                               for i in range(4)},
            "payload end": size - 5, "CRC": size - 2}


def cut_lengths(size: int) -> dict[str, int]:
    """How much of the file each truncation keeps (negative: all but that many)."""
    return {"10 bytes": 10, "header only": ART_HEADER.size, "half": size // 2, "without the CRC": -4,
            "without its last byte": -1, "empty": 0}


def flip_slot(index: int, where: str) -> Slot:
    """A.bin with bit 3 flipped at `where`, read by the three readers in turn."""
    reader, argv = READERS[index % 3]
    name = f"byte flipped: {where} ({reader})"

    def make(ctx: Ctx) -> Case:
        offset = flip_offsets(*layout(ctx))[where]
        return Case("artifact", name, argv, names=ART, setup=chain(copy("A.bin"), edit("A.bin", flip(offset, 3))),
                    corrupt=True)
    return Slot(name, make)


def cut_slot(index: int, what: str) -> Slot:
    """A.bin truncated as `what` says, read by eval and sample in turn."""
    reader, argv = READERS[index % 2]
    name = f"truncated: {what} ({reader})"

    def make(ctx: Ctx) -> Case:
        keep = cut_lengths(layout(ctx)[0])[what]
        return Case("artifact", name, argv, names=ART, setup=chain(copy("A.bin"), edit("A.bin", cut(keep))),
                    corrupt=True)
    return Slot(name, make)


def crafted_cases() -> list[Case]:
    """Random bytes, a checkpoint, garbage appended; files re-sealed (CRC fixed) around bad metadata or payload."""
    return [
        Case("artifact", "random bytes", EVAL, names=ART,
             setup=files({"A.bin": random.Random(SEED + 6).randbytes(4000)}), corrupt=True),
        Case("artifact", "a checkpoint given as artifact", EVAL, names=ART, setup=copy("R/model.pt", "A.bin"),
             corrupt=True),
        Case("artifact", "garbage appended", EVAL, names=ART,
             setup=chain(copy("A.bin"), edit("A.bin", lambda d: d + b"extra")), corrupt=True),
        Case("artifact", "re-sealed: metadata not JSON", EVAL, names=ART,
             setup=artifact(lambda m: b"{not json"), corrupt=True),
        Case("artifact", "re-sealed: metadata a JSON number", EVAL, names=ART,
             setup=artifact(lambda m: b"5"), corrupt=True),
        Case("artifact", "re-sealed: tensor table garbage", EVAL, names=ART,
             setup=artifact(meta_with(tensors="x")), corrupt=True),
        Case("artifact", "re-sealed: tensor entries garbage", SAMPLE, names=ART,
             setup=artifact(meta_with(tensors=[{"name": "x"}])), corrupt=True),
        Case("artifact", "re-sealed: unknown compressor", EVAL, names=ART,
             setup=artifact(meta_with(compressor="rar")), corrupt=True),
        Case("artifact", "re-sealed: config says 3 layers", EVAL, names=ART,
             setup=artifact(meta_config(num_layers=3)), corrupt=True),
        Case("artifact", "re-sealed: config seq_len 0", SAMPLE, names=ART,
             setup=artifact(meta_config(seq_len=0)), corrupt=True),
        Case("artifact", "re-sealed: config vocab 100", EVAL, names=ART,
             setup=artifact(meta_config(vocab_size=100)), corrupt=True),
        Case("artifact", "re-sealed: payload_bytes a string", EVAL, names=ART,
             setup=artifact(meta_with(payload_bytes="many")), corrupt=True),
        Case("artifact", "re-sealed: payload short of its tensors", EVAL, names=ART,
             setup=artifact(fn_raw=lambda raw: raw[:-100]), corrupt=True),
        Case("artifact", "re-sealed: NaN weights", EVAL, names=ART,
             setup=artifact(fn_raw=lambda raw: b"\xff" * len(raw)), corrupt=True),
        Case("artifact", "re-sealed: NaN weights (sample)", SAMPLE, names=ART,
             setup=artifact(fn_raw=lambda raw: b"\xff" * len(raw)), corrupt=True),
    ]


def artifact_cases() -> list[Slot]:
    """Flipped bytes in header, metadata, payload and CRC; truncations; crafted re-sealed files."""
    flips = [flip_slot(index, where) for index, where in enumerate(flip_offsets(ANY_SIZE, ANY_META))]
    cuts = [cut_slot(index, what) for index, what in enumerate(cut_lengths(ANY_SIZE))]
    return [*flips, *cuts, *fixed(crafted_cases())]


@pytest.mark.parametrize("slot", artifact_cases(), ids=slot_id)
def test_artifact(slot: Slot, run_slot: Callable[[Slot], None]) -> None:
    run_slot(slot)
