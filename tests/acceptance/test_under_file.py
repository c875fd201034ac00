"""Acceptance battery, category "under-file" (runner.py says how a case is judged)."""
from __future__ import annotations

from collections.abc import Callable

import pytest

from .mutators import files
from .runner import TINY, Case, Slot, fixed, slot_id


def under_file_cases() -> list[Slot]:
    """An output path below a regular file: exit 2 naming the path; the file stays as it was."""
    blocker = files({"F": b"a regular file, not a folder\n"})
    out = "{C}/F/sub"
    return fixed([
        Case("under-file", "prepare --out", ("prepare", "--docs", "{DOCS}", "--tokenizer", "{T}", "--out", out,
                                             "--val-docs", "20"), names=out, setup=blocker),
        Case("under-file", "train --out", ("train", "--data", "{D}", "--out", out, *TINY, "--steps", "1"),
             names=out, setup=blocker),
        Case("under-file", "export --out", ("export", "--run", "{R}", "--out", f"{out}/A.bin"),
             names=f"{out}/A.bin", setup=blocker),
        Case("under-file", "export --json", ("export", "--run", "{R}", "--out", "{C}/A.bin", "--json",
                                             f"{out}/r.json"), names=f"{out}/r.json", setup=blocker,
             mutable=("A.bin",)),
        Case("under-file", "compress output", ("compress", "--run", "{R}", "{TXT}", f"{out}/x.mdz"),
             names=f"{out}/x.mdz", setup=blocker),
        Case("under-file", "decompress output", ("decompress", "--run", "{R}", "{M}", f"{out}/x.txt"),
             names=f"{out}/x.txt", setup=blocker),
        Case("under-file", "eval --json", ("eval", "--run", "{R}", "--data", "{D}", "--num-seqs", "2",
                                           "--elbo-steps", "2", "--json", f"{out}/e.json"),
             names=f"{out}/e.json", setup=blocker),
        Case("under-file", "submission --out", ("submission", "--run", "{R}", "--artifact", "{A}", "--data",
                                                "{D}", "--out", out, "--name", "x", "--github-id", "y",
                                                "--num-seqs", "2", "--elbo-steps", "2"), names=out,
             setup=blocker),
        Case("under-file", "download --out", ("download", "--out", out, "--train-shards", "1", "--quiet"),
             names=out, setup=blocker),
        Case("under-file", "ablate --out", ("ablate", "--param", "lr", "--values", "1e-3", "--data", "{D}",
                                            "--out", out, *TINY, "--steps", "1"), names=out, setup=blocker),
        Case("under-file", "race --out", ("race", "--recipes", "today", "--seeds", "1", "--data", "{D}",
                                          "--out", out, *TINY, "--steps", "1"), names=out, setup=blocker),
    ])


@pytest.mark.parametrize("slot", under_file_cases(), ids=slot_id)
def test_under_file(slot: Slot, run_slot: Callable[[Slot], None]) -> None:
    run_slot(slot)
