"""Acceptance battery, category "race-signals": SIGINT or SIGTERM while a race's or an ablation's run trains
checkpoints that run, writes no summary for it and exits 130 / 143 in one line naming RUN/checkpoint.pt;
the same command again resumes it and finishes. A rerun over a finished run whose files are damaged is one
line naming the file; a recipe naming an unknown field says so (runner.py says how a case is judged)."""
from __future__ import annotations

import signal
from collections.abc import Callable

import pytest

from .mutators import Setup, chain, const, copy_built, edit, move, unlink
from .runner import (FINISHED_ABLATION, FINISHED_RACE, INTERRUPTED, OK, RUN_INTERRUPTED, RUN_TERMINATED, TINY, Case,
                     Slot, fixed, slot_id)

# long enough to signal mid-run (the watched run logs every step), short enough for the rerun to finish
LONG = ("--data", "{D}", "--out", "{C}/O", *TINY, "--steps", "60", "--batch-rows", "32", "--eval-num-seqs", "2",
        "--elbo-steps", "2")
RACE = ("race", "--recipes", "today", "--seeds", "1", *LONG)
ABLATE = ("ablate", "--param", "lr", "--values", "1e-3", "--seeds", "1", *LONG)
RACE_RUN, ABLATE_RUN = "O/runs/today_seed=1", "O/runs/lr=0.001_seed=1"  # the runs' folders


def stopped(name: str, argv: tuple[str, ...], run: str, sig: signal.Signals) -> Case:
    """Signal the command while `run` trains; it must stop with that run checkpointed, and a rerun finish it."""
    expect = RUN_TERMINATED if sig == signal.SIGTERM else RUN_INTERRUPTED
    return Case("race-signals", name, argv, expect=expect, names=f"{{C}}/{run}/checkpoint.pt", runner="signal",
                signal_plan=("rerun", sig), watch=run, mutable=("O/",),
                preamble=sig == signal.SIGINT)  # a first Ctrl-C says "stopping ..." first


def signal_cases() -> list[Case]:
    return [
        stopped("race: SIGTERM, then the rerun resumes", RACE, RACE_RUN, signal.SIGTERM),
        stopped("race: Ctrl-C, then the rerun resumes", RACE, RACE_RUN, signal.SIGINT),
        stopped("ablate: SIGTERM, then the rerun resumes", ABLATE, ABLATE_RUN, signal.SIGTERM),
        stopped("ablate: Ctrl-C, then the rerun resumes", ABLATE, ABLATE_RUN, signal.SIGINT),
        stopped("race: SIGTERM in the second recipe's run", ("race", "--recipes", "today,ar", "--seeds", "1", *LONG),
                "O/runs/ar_seed=1", signal.SIGTERM),
        Case("race-signals", "race: Ctrl-C twice aborts, exit 130", RACE, expect=INTERRUPTED, runner="signal",
             signal_plan=("twice", signal.SIGINT), watch=RACE_RUN, preamble=True, mutable=("O/",)),
    ]


def damaged(name: str, built: str, argv: tuple[str, ...], names: str, *steps: Setup) -> Case:
    """Rerun a finished race or ablation (a copy of it in O) after `steps` damaged one of its runs."""
    return Case("race-signals", name, (*argv, "--out", "{C}/O"), names=names,
                setup=chain(copy_built(built, "O"), *steps))


def rerun_cases() -> list[Case]:
    """Reruns over a finished race or ablation with a run's config, summary or eval damaged."""
    run = "O/runs/today_seed=1"
    config, summary, evals = f"{run}/config.json", f"{run}/train_summary.json", f"{run}/eval.json"
    ablation_config = "O/runs/lr=0.001_seed=1/config.json"

    def race(name: str, names: str, *steps: Setup) -> Case:
        return damaged(name, "race", FINISHED_RACE, names, *steps)

    return [
        Case("race-signals", "race rerun: a finished race is reused", (*FINISHED_RACE, "--out", "{C}/O"), expect=OK,
             setup=copy_built("race", "O"), mutable=("O/race.",)),  # the report is written again
        race("race rerun: a finished run's config.json a JSON list", f"{{C}}/{config}", edit(config, const(b"[]"))),
        race("race rerun: a finished run's config.json not JSON", f"{{C}}/{config}", edit(config, const(b"{oops"))),
        race("race rerun: a finished run's config.json from another config", f"{{C}}/{run}",
             edit(config, lambda d: d.replace(b'"steps": 2', b'"steps": 3'))),
        race("race rerun: a finished run's train_summary.json not JSON", f"{{C}}/{summary}",
             edit(summary, const(b"\xff\xfe not json"))),
        race("race rerun: a finished run's eval.json a JSON list", f"{{C}}/{evals}", edit(evals, const(b"[1, 2]"))),
        race("race rerun: a stopped run's config.json not JSON", f"{{C}}/{config}", unlink(summary), unlink(evals),
             move(f"{run}/model.pt", f"{run}/checkpoint.pt"), edit(config, const(b"{oops"))),
        damaged("ablate rerun: a finished run's config.json not JSON", "ablation", FINISHED_ABLATION,
                f"{{C}}/{ablation_config}", edit(ablation_config, const(b"{oops"))),
        damaged("ablate rerun: a finished run's config.json a JSON number", "ablation", FINISHED_ABLATION,
                f"{{C}}/{ablation_config}", edit(ablation_config, const(b"5"))),
    ]


def recipe_cases() -> list[Case]:
    """Recipes and ablated fields that do not exist or do not parse: one line, nothing written."""
    common = ("--seeds", "1", "--data", "{D}", "--out", "{C}/O", *TINY, "--steps", "1")
    race = ("race", *common)
    return [Case("race-signals", name, argv, names=names, pristine=True) for name, argv, names in [
        ("race --recipe x:nosuch_field=1", (*race, "--recipe", "x:nosuch_field=1"),
         "recipe 'x': unknown config field 'nosuch_field'; the fields are "),
        ("race --recipe x:lr=abc", (*race, "--recipe", "x:lr=abc"), ("recipe 'x'", "lr")),
        ("race --recipe x:lr (no value)", (*race, "--recipe", "x:lr"), "recipe 'x:lr'"),
        ("race --recipes nosuch", (*race, "--recipes", "nosuch"), "unknown recipe 'nosuch'"),
        ("ablate --param nosuch_field", ("ablate", "--param", "nosuch_field", "--values", "1", *common),
         "unknown config field 'nosuch_field'"),
    ]]


def race_signal_cases() -> list[Slot]:
    return fixed([*signal_cases(), *rerun_cases(), *recipe_cases()])


@pytest.mark.parametrize("slot", race_signal_cases(), ids=slot_id)
def test_race_signals(slot: Slot, run_slot: Callable[[Slot], None]) -> None:
    run_slot(slot)
