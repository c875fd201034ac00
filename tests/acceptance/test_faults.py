"""Acceptance battery, category "faults" (runner.py says how a case is judged)."""
from __future__ import annotations

import signal
from collections.abc import Callable

import pytest

from .mutators import chain, checks, copy, exists, live_temp_kept, model_at, no_temp_left, stale_temp
from .runner import INTERRUPTED, OK, TINY, Case, Slot, fixed, slot_id


def fault_cases() -> list[Slot]:
    """Signals to a running train, a killed run resumed, stale temporaries of killed writers."""
    long_run = ("train", "--data", "{D}", "--out", "{C}/R", *TINY, "--steps", "3000", "--batch-rows", "32",
                "--no-eval")
    resume = ("train", "--resume", "{C}/R", "--data", "{D}", "--no-eval", "--steps", "6", "--checkpoint-every", "1")
    return fixed([
        Case("faults", "Ctrl-C once: checkpoint, clean exit, resumable", long_run, expect=OK, runner="signal",
             signal_plan=("once", signal.SIGINT), preamble=True),
        Case("faults", "SIGTERM: checkpoint, clean exit, resumable", long_run, expect=OK, runner="signal",
             signal_plan=("once", signal.SIGTERM)),
        Case("faults", "Ctrl-C twice: abort, exit 130", long_run, expect=INTERRUPTED, runner="signal",
             signal_plan=("twice", signal.SIGINT), preamble=True),
        Case("faults", "SIGKILL after a checkpoint, then --resume", (*long_run, "--checkpoint-every", "3"),
             expect=OK, runner="signal", signal_plan=("kill", signal.SIGKILL)),
        Case("faults", "Ctrl-C while the command starts up", long_run, expect=INTERRUPTED, runner="signal",
             signal_plan=("startup", signal.SIGINT), preamble=True),
        Case("faults", "stale checkpoint.pt temporary of a killed writer, resume", resume, expect=OK,
             setup=chain(copy("R"), stale_temp("R/checkpoint.pt", "dead"), stale_temp("R/model.pt", "dead")),
             mutable=("R/",), check=checks(no_temp_left("R"), model_at("R/model.pt", 6))),
        Case("faults", "a live writer's temporary is left alone", resume, expect=OK,
             setup=chain(copy("R"), stale_temp("R/checkpoint.pt", "live")), mutable=("R/",),
             check=checks(live_temp_kept("R"), model_at("R/model.pt", 6))),
        Case("faults", "eval with a stale temporary beside model.pt", ("eval", "--run", "{C}/R", "--data", "{D}",
                                                                       "--num-seqs", "2", "--elbo-steps", "2"),
             expect=OK, setup=chain(copy("R"), stale_temp("R/model.pt", "dead"))),
        Case("faults", "export over an existing artifact (atomic replace)", ("export", "--run", "{R}", "--out",
                                                                             "{C}/A.bin", "--overwrite"),
             expect=OK, setup=copy("A.bin"), mutable=("A.bin",), check=exists("A.bin")),
    ])


@pytest.mark.parametrize("slot", fault_cases(), ids=slot_id)
def test_faults(slot: Slot, run_slot: Callable[[Slot], None]) -> None:
    run_slot(slot)
