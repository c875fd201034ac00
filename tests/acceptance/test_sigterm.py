"""Acceptance battery, category "sigterm": SIGTERM (or Ctrl-C) to any command is one line and exit 143
(130); export, compress and decompress, which spend long stretches in C, end within about a second of it,
and what they were replacing is kept (runner.py says how a case is judged)."""
from __future__ import annotations

import signal
from collections.abc import Callable

import pytest

from .mutators import Setup, absent, chain, copy, files, needs
from .runner import INTERRUPTED, TERMINATED, TINY, Case, Slot, fixed, slot_id

LATENCY = 1.5  # seconds from the signal to the exit: "about a second", on a busy machine
WORK = 8.0  # CPU seconds before the signal: past the start-up (imports, loading a model), into the work
BIG = ("--run", "{X}/big", "--tokenizer", "{T}")  # the ~23M-parameter model (runner.build_big)
EXPORT = ("export", "--run", "{X}/big", "--out", "{C}/A.bin", "--compressor", "best", "--quant", "int8",
          "--allow-oversize")
DECOMPRESS = ("decompress", "--run", "{R}", "{X}/long/long.mdz", "{C}/out.txt")
OLD = b"the previous version, to be kept\n"


def during(name: str, argv: tuple[str, ...], setup: Setup | None, sig: signal.Signals = signal.SIGTERM,
           latency: float = 0, cpu: float = WORK, **options) -> Case:
    """A signal once the command has worked `cpu` CPU seconds: one line, 143 (130 for Ctrl-C), within
    `latency` seconds of the signal (0: no bound)."""
    expect = TERMINATED if sig == signal.SIGTERM else INTERRUPTED
    return Case("sigterm", name, argv, expect=expect, runner="signal", signal_plan=("after", sig, cpu, latency),
                setup=setup, **options)


def at_startup(command: str, argv: tuple[str, ...]) -> Case:
    """SIGTERM 0.4 s after the start, while the command imports: one line, 143."""
    return Case("sigterm", f"{command}: SIGTERM while it starts up", argv, expect=TERMINATED, runner="signal",
                signal_plan=("startup", signal.SIGTERM))


def sigterm_cases() -> list[Slot]:
    big, long_mdz = needs("big"), needs("long")
    scoring = ("--data", "{D}", "--num-seqs", "0", "--elbo-steps", "64")
    return fixed([
        during("export: SIGTERM while it compresses", EXPORT, big, latency=LATENCY),
        during("export --overwrite: SIGTERM, the old artifact kept", (*EXPORT, "--overwrite"),
               chain(big, copy("A.bin")), latency=LATENCY),
        during("export: Ctrl-C while it compresses", EXPORT, big, sig=signal.SIGINT, latency=LATENCY),
        during("compress: SIGTERM while it codes", ("compress", *BIG, "{DOCS}", "{C}/x.mdz"), big, latency=LATENCY),
        during("decompress: SIGTERM while it decodes", DECOMPRESS, long_mdz, latency=LATENCY, cpu=6.0),
        during("decompress --overwrite: SIGTERM, the old file kept", (*DECOMPRESS, "--overwrite"),
               chain(long_mdz, files({"out.txt": OLD})), latency=LATENCY, cpu=6.0),
        during("eval: SIGTERM while it scores", ("eval", *BIG, "--data", "{D}", "--num-seqs", "8", "--elbo-steps",
                                                 "8"), big),
        during("eval: Ctrl-C while it scores", ("eval", *BIG, "--data", "{D}", "--num-seqs", "8", "--elbo-steps",
                                                "8"), big, sig=signal.SIGINT),
        during("sample: SIGTERM while it denoises", ("sample", *BIG, "--length", "256", "--steps", "64"), big,
               cpu=6.0),
        during("submission: SIGTERM while it scores, no record folder", ("submission", "--run", "{R}", "--artifact",
                                                                         "{A}", *scoring, "--out", "{C}/S", "--name",
                                                                         "x", "--github-id", "y"),
               None, cpu=6.0, check=absent("S")),
        at_startup("train", ("train", "--data", "{D}", "--out", "{C}/R", *TINY, "--steps", "2", "--no-eval")),
        at_startup("race", ("race", "--recipes", "today", "--seeds", "1", "--data", "{D}", "--out", "{C}/O", *TINY,
                            "--steps", "2")),
        at_startup("prepare", ("prepare", "--docs", "{DOCS}", "--out", "{C}/D", "--val-docs", "20", "--vocab-size",
                               "1024")),
        at_startup("export", ("export", "--run", "{R}", "--out", "{C}/A.bin")),
    ])


@pytest.mark.parametrize("slot", sigterm_cases(), ids=slot_id)
def test_sigterm(slot: Slot, run_slot: Callable[[Slot], None]) -> None:
    run_slot(slot)
