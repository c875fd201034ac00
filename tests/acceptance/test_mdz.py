"""Acceptance battery, category "mdz" (runner.py says how a case is judged)."""
from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from .mutators import Setup, chain, copy, cut, edit, files, flip
from .runner import EXACT, SEED, Case, Ctx, Slot, fixed, slot_id

DEC = ("decompress", "--run", "{R}", "{C}/x.mdz", "{C}/out.txt")
MDZ = "{C}/x.mdz"
ANY_SIZE, ANY_HEADER = 1 << 16, 64  # the labels below do not depend on the sizes: any sizes list them


def layout(ctx: Ctx) -> tuple[int, int]:
    """The built text.mdz's size and header length: where its flips and cuts land."""
    return ctx.path("text.mdz").stat().st_size, ctx.mdz_header


def flip_offsets(size: int, header: int) -> dict[str, int]:
    """The header's fields, its fingerprint and CRC, the code (its first byte, three seeded ones, the last)."""
    rng = random.Random(SEED + 7)
    return {"magic": 0, "version": 4, "flags": 5, "order": 6, "first varint": 7, "varint 3": 9,
            "header 12": 12, "fingerprint": header - 10, "header CRC": header - 2, "first code byte": header,
            **{f"code {i}": rng.randrange(header + 1, size - 1) for i in range(3)}, "last byte": size - 1}


def cut_lengths(size: int, header: int) -> dict[str, int]:
    """How much of the file each truncation keeps (negative: all but that many)."""
    return {"3 bytes": 3, "header minus 1": header - 1, "header only": header, "half": size // 2,
            "without its last byte": -1, "empty": 0}


def flip_slot(index: int, where: str) -> Slot:
    """x.mdz with bit index % 8 flipped at `where`: refused, or the original rebuilt exactly."""
    bit = index % 8

    def make(ctx: Ctx) -> Case:
        offset = flip_offsets(*layout(ctx))[where]
        return Case("mdz", f"bit {bit} flipped: {where} (byte {offset})", DEC, expect=EXACT, names=MDZ,
                    setup=chain(copy("text.mdz", "x.mdz"), edit("x.mdz", flip(offset, bit))), corrupt=True,
                    output="out.txt")
    return Slot(f"bit {bit} flipped: {where}", make)


def cut_slot(what: str) -> Slot:
    """x.mdz truncated as `what` says: refused, or the original rebuilt exactly."""
    name = f"truncated: {what}"

    def make(ctx: Ctx) -> Case:
        keep = cut_lengths(*layout(ctx))[what]
        return Case("mdz", name, DEC, expect=EXACT, names=MDZ,
                    setup=chain(copy("text.mdz", "x.mdz"), edit("x.mdz", cut(keep))), corrupt=True, output="out.txt")
    return Slot(name, make)


def flip_past_header(past: int, bit: int) -> Setup:
    """Flip a bit of x.mdz `past` bytes into its code (the header's length is known once text.mdz is built)."""
    return lambda ctx, c: edit("x.mdz", flip(ctx.mdz_header + past, bit))(ctx, c)


def other_cases() -> list[Case]:
    """Padded, random, the wrong kind of file, the wrong model or tokenizer, an output file already there."""
    return [
        Case("mdz", "garbage appended", DEC, expect=EXACT, names=MDZ, output="out.txt", corrupt=True,
             setup=chain(copy("text.mdz", "x.mdz"), edit("x.mdz", lambda d: d + b"\x07garbage"))),
        Case("mdz", "random bytes", DEC, names=MDZ, corrupt=True,
             setup=files({"x.mdz": random.Random(SEED + 8).randbytes(3000)})),
        Case("mdz", "random bytes after the magic", DEC, names=MDZ, corrupt=True,
             setup=files({"x.mdz": b"MDZ1\x02" + random.Random(SEED + 9).randbytes(3000)})),
        Case("mdz", "a text file given as .mdz", DEC, names=MDZ, corrupt=True, setup=copy("text.txt", "x.mdz")),
        Case("mdz", "decoded with another run's model", ("decompress", "--run", "{R2}", "{M}", "{C}/out.txt"),
             names="{M}", corrupt=True),
        Case("mdz", "decoded with another tokenizer", ("decompress", "--run", "{R}", "--tokenizer", "{T2}", "{M}",
                                                       "{C}/out.txt"), names="{M}", corrupt=True),
        Case("mdz", "decoded with a junk tokenizer", ("decompress", "--run", "{R}", "--tokenizer", "{C}/junk.model",
                                                      "{M}", "{C}/out.txt"), names="{C}/junk.model", corrupt=True,
             setup=files({"junk.model": b"not a model"})),
        Case("mdz", "decoded with a run folder that has no model.pt", ("decompress", "--run", "{C}/E",
                                                                               "{M}", "{C}/out.txt"),
             names="{C}/E/model.pt", setup=files({"E": None})),
        # --overwrite: the output may be replaced, but only by a faithful decoding; a refusal keeps it
        Case("mdz", "corrupt .mdz onto an existing output file", (*DEC, "--overwrite"), names=MDZ, corrupt=True,
             setup=chain(copy("text.mdz", "x.mdz"), flip_past_header(3, 2),
                         files({"out.txt": b"my precious file\n"}))),
        Case("mdz", "compressed with one run, decoded by another, onto an existing file",
             ("decompress", "--run", "{R2}", "{M}", "{C}/out.txt", "--overwrite"), names="{M}", corrupt=True,
             setup=files({"out.txt": b"my precious file\n"})),
    ]


def mdz_cases() -> list[Slot]:
    """A .mdz flipped at several offsets, cut, padded, or decoded with the wrong model or tokenizer: refused
    (or, where the damage happens not to matter, the original rebuilt exactly); a file already at the
    output path is left as it was."""
    flips = [flip_slot(index, where) for index, where in enumerate(flip_offsets(ANY_SIZE, ANY_HEADER))]
    cuts = [cut_slot(what) for what in cut_lengths(ANY_SIZE, ANY_HEADER)]
    return [*flips, *cuts, *fixed(other_cases())]


@pytest.mark.parametrize("slot", mdz_cases(), ids=slot_id)
def test_mdz(slot: Slot, run_slot: Callable[[Slot], None]) -> None:
    run_slot(slot)
