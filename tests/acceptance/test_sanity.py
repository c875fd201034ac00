"""Acceptance battery, category "sanity" (runner.py says how a case is judged)."""
from __future__ import annotations

from collections.abc import Callable

import pytest

from .mutators import exists
from .runner import OK, TINY, Case, Slot, fixed, slot_id


def sanity_cases() -> list[Slot]:
    """Each command once with good inputs: the refusals above come from the bad input, not a broken setup."""
    return fixed([
        Case("sanity", "prepare", ("prepare", "--docs", "{DOCS}", "--tokenizer", "{T}", "--out", "{C}/D",
                                   "--val-docs", "20"), expect=OK, check=exists("D/manifest.json")),
        Case("sanity", "train", ("train", "--data", "{D}", "--out", "{C}/R", *TINY, "--steps", "2",
                                 "--eval-num-seqs", "2", "--elbo-steps", "2"), expect=OK, check=exists("R/model.pt")),
        Case("sanity", "eval --run", ("eval", "--run", "{R}", "--data", "{D}", "--num-seqs", "2", "--elbo-steps",
                                      "2", "--json", "{C}/e.json"), expect=OK, check=exists("e.json")),
        Case("sanity", "eval --artifact", ("eval", "--artifact", "{A}", "--data", "{D}", "--num-seqs", "2",
                                           "--elbo-steps", "2"), expect=OK),
        Case("sanity", "eval --method planned", ("eval", "--run", "{R}", "--data", "{D}", "--num-seqs", "2",
                                                 "--method", "planned", "--passes", "8"), expect=OK),
        Case("sanity", "sample --artifact", ("sample", "--artifact", "{A}", "--length", "16", "--steps", "4"),
             expect=OK),
        Case("sanity", "export", ("export", "--run", "{R}", "--out", "{C}/A.bin"), expect=OK, check=exists("A.bin")),
        Case("sanity", "submission", ("submission", "--run", "{R}", "--artifact", "{A}", "--data", "{D}", "--out",
                                      "{C}/S", "--name", "hostile", "--github-id", "nobody", "--num-seqs", "2",
                                      "--elbo-steps", "2"), expect=OK, check=exists("S")),
        Case("sanity", "ablate", ("ablate", "--param", "lr", "--values", "1e-3,2e-3", "--data", "{D}", "--out",
                                  "{C}/O", *TINY, "--steps", "2", "--eval-num-seqs", "2", "--elbo-steps", "2"),
             expect=OK),
        Case("sanity", "race", ("race", "--recipes", "today,ar", "--seeds", "1", "--data", "{D}", "--out", "{C}/O",
                                *TINY, "--steps", "2", "--eval-num-seqs", "2", "--elbo-steps", "2"), expect=OK),
    ])


@pytest.mark.parametrize("slot", sanity_cases(), ids=slot_id)
def test_sanity(slot: Slot, run_slot: Callable[[Slot], None]) -> None:
    run_slot(slot)
