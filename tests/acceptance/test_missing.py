"""Acceptance battery, category "missing" (runner.py says how a case is judged)."""
from __future__ import annotations

from collections.abc import Callable

import pytest

from .mutators import chain, copy, files, unlink
from .runner import TINY, Case, Slot, fixed, slot_id


def missing_cases() -> list[Slot]:
    """Files and folders that are not there: exit 2 naming them."""
    gone = "{C}/missing"
    return fixed([
        Case("missing", "prepare --docs", ("prepare", "--docs", f"{gone}.jsonl", "--tokenizer", "{T}", "--out",
                                           "{C}/D", "--val-docs", "20"), names=f"{gone}.jsonl"),
        Case("missing", "prepare --tokenizer", ("prepare", "--docs", "{DOCS}", "--tokenizer", f"{gone}.model",
                                                "--out", "{C}/D", "--val-docs", "20"), names=f"{gone}.model"),
        Case("missing", "train --data", ("train", "--data", gone, "--out", "{C}/R", *TINY), names=gone),
        Case("missing", "train --tokenizer", ("train", "--data", "{D}", "--tokenizer", f"{gone}.model",
                                              "--out", "{C}/R", *TINY, "--steps", "1"), names=f"{gone}.model"),
        Case("missing", "train --resume", ("train", "--resume", gone, "--data", "{D}"), names=gone),
        Case("missing", "train --resume without checkpoint.pt", ("train", "--resume", "{C}/R", "--data", "{D}"),
             names="{C}/R/checkpoint.pt", setup=chain(copy("R"), unlink("R/checkpoint.pt"))),
        Case("missing", "eval --run", ("eval", "--run", gone, "--data", "{D}"), names=gone),
        Case("missing", "eval --run: empty folder", ("eval", "--run", "{C}/E", "--data", "{D}"),
             names="{C}/E/model.pt", setup=files({"E": None})),
        Case("missing", "eval --artifact", ("eval", "--artifact", f"{gone}.bin", "--data", "{D}"),
             names=f"{gone}.bin"),
        Case("missing", "eval --data", ("eval", "--run", "{R}", "--data", gone), names=gone),
        Case("missing", "sample --run", ("sample", "--run", gone), names=gone),
        Case("missing", "sample --artifact", ("sample", "--artifact", f"{gone}.bin"), names=f"{gone}.bin"),
        Case("missing", "sample --tokenizer", ("sample", "--run", "{R}", "--tokenizer", f"{gone}.model",
                                               "--length", "8", "--steps", "2"), names=f"{gone}.model"),
        Case("missing", "export --run", ("export", "--run", gone, "--out", "{C}/A.bin"), names=gone),
        Case("missing", "export --data for gptq", ("export", "--run", "{R}", "--out", "{C}/A.bin", "--method",
                                                   "gptq", "--data", gone), names=gone),
        Case("missing", "compress input", ("compress", "--run", "{R}", f"{gone}.txt", "{C}/x.mdz"),
             names=f"{gone}.txt"),
        Case("missing", "compress --run", ("compress", "--run", gone, "{TXT}", "{C}/x.mdz"), names=gone),
        Case("missing", "decompress input", ("decompress", "--run", "{R}", f"{gone}.mdz", "{C}/x.txt"),
             names=f"{gone}.mdz"),
        Case("missing", "decompress --run", ("decompress", "--run", gone, "{M}", "{C}/x.txt"), names=gone),
        Case("missing", "submission --artifact", ("submission", "--run", "{R}", "--artifact", f"{gone}.bin",
                                                  "--data", "{D}", "--out", "{C}/S", "--name", "x",
                                                  "--github-id", "y"), names=f"{gone}.bin"),
        Case("missing", "submission --run", ("submission", "--run", gone, "--artifact", "{A}", "--data", "{D}",
                                             "--out", "{C}/S", "--name", "x", "--github-id", "y",
                                             "--num-seqs", "2", "--elbo-steps", "2"), names=gone),
        Case("missing", "ablate --data", ("ablate", "--param", "lr", "--values", "1e-3", "--data", gone,
                                          "--out", "{C}/O", *TINY, "--steps", "1"), names=gone),
    ])


@pytest.mark.parametrize("slot", missing_cases(), ids=slot_id)
def test_missing(slot: Slot, run_slot: Callable[[Slot], None]) -> None:
    run_slot(slot)
