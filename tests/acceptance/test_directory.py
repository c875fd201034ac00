"""Acceptance battery, category "directory" (runner.py says how a case is judged)."""
from __future__ import annotations

from collections.abc import Callable

import pytest

from .mutators import chain, copy, files, to_dir
from .runner import TINY, Case, Slot, fixed, slot_id


def directory_cases() -> list[Slot]:
    """A folder where a file belongs: exit 2 naming it; a folder in the way of an output is left alone."""
    folder = files({"F": None, "F/keep.txt": b"precious\n"})
    return fixed([
        Case("directory", "prepare --docs is a folder", ("prepare", "--docs", "{C}/F", "--tokenizer", "{T}",
                                                         "--out", "{C}/D", "--val-docs", "20"), names="{C}/F",
             setup=folder),
        Case("directory", "prepare --tokenizer is a folder", ("prepare", "--docs", "{DOCS}", "--tokenizer",
                                                              "{C}/F", "--out", "{C}/D", "--val-docs", "20"),
             names="{C}/F", setup=folder),
        Case("directory", "train --tokenizer is a folder", ("train", "--data", "{D}", "--tokenizer", "{C}/F",
                                                            "--out", "{C}/R", *TINY, "--steps", "1"),
             names="{C}/F", setup=folder),
        Case("directory", "eval --artifact is a folder", ("eval", "--artifact", "{C}/F", "--data", "{D}"),
             names="{C}/F", setup=folder),
        Case("directory", "sample --artifact is a folder", ("sample", "--artifact", "{C}/F"), names="{C}/F",
             setup=folder),
        Case("directory", "eval: RUN/model.pt is a folder", ("eval", "--run", "{C}/R", "--data", "{D}"),
             names="{C}/R/model.pt", setup=chain(copy("R"), to_dir("R/model.pt"))),
        Case("directory", "resume: RUN/checkpoint.pt is a folder", ("train", "--resume", "{C}/R", "--data", "{D}"),
             names="{C}/R/checkpoint.pt", setup=chain(copy("R"), to_dir("R/checkpoint.pt"))),
        Case("directory", "compress input is a folder", ("compress", "--run", "{R}", "{C}/F", "{C}/x.mdz"),
             names="{C}/F", setup=folder),
        Case("directory", "compress output is a folder", ("compress", "--run", "{R}", "{TXT}", "{C}/F"),
             names="{C}/F", setup=folder),
        Case("directory", "decompress input is a folder", ("decompress", "--run", "{R}", "{C}/F", "{C}/x.txt"),
             names="{C}/F", setup=folder),
        Case("directory", "decompress output is a folder", ("decompress", "--run", "{R}", "{M}", "{C}/F"),
             names="{C}/F", setup=folder),
        Case("directory", "export --out is a folder", ("export", "--run", "{R}", "--out", "{C}/F"),
             names="{C}/F", setup=folder),
        Case("directory", "eval --json is a folder", ("eval", "--run", "{R}", "--data", "{D}", "--num-seqs", "2",
                                                      "--elbo-steps", "2", "--json", "{C}/F"), names="{C}/F",
             setup=folder),
        Case("directory", "val shard is a folder", ("eval", "--run", "{R}", "--data", "{C}/D", "--num-seqs", "2",
                                                    "--elbo-steps", "2"), names="{C}/D/fineweb_val_000000.bin",
             setup=chain(copy("D"), to_dir("D/fineweb_val_000000.bin"))),
        Case("directory", "train shard is a folder", ("train", "--data", "{C}/D", "--out", "{C}/R", *TINY,
                                                      "--steps", "2", "--no-eval"),
             names="{C}/D/fineweb_train_000000.bin",
             setup=chain(copy("D"), to_dir("D/fineweb_train_000000.bin"))),
        Case("directory", "manifest.json is a folder", ("train", "--data", "{C}/D", "--out", "{C}/R", *TINY,
                                                        "--steps", "1", "--no-eval"),
             names="{C}/D/manifest.json", setup=chain(copy("D"), to_dir("D/manifest.json"))),
    ])


@pytest.mark.parametrize("slot", directory_cases(), ids=slot_id)
def test_directory(slot: Slot, run_slot: Callable[[Slot], None]) -> None:
    run_slot(slot)
