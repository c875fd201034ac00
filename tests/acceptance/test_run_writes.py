"""Acceptance battery, category "run-writes": an output onto a file (or a record folder onto a folder) the
command reads is refused, even with --overwrite, and what it reads is left as it was (runner.py says how
a case is judged)."""
from __future__ import annotations

from collections.abc import Callable

import pytest

from .mutators import Setup, chain, config_json, copy, files, symlink
from .runner import Case, Slot, fixed, slot_id

READS = "is a file this command reads"
RUN_FILES = ("model.pt", "checkpoint.pt", "config.json", "metrics.jsonl", "train.log", "eval.json")
EXPORT = ("export", "--run", "{C}/R")
EVAL = ("eval", "--data", "{D}", "--num-seqs", "2", "--elbo-steps", "2")
TEXT = files({"in.txt": b"some text to compress, and nothing else\n"})


def submission(run: str, artifact: str, data: str, out: str) -> tuple[str, ...]:
    return ("submission", "--run", run, "--artifact", artifact, "--data", data, "--out", out, "--name", "x",
            "--github-id", "y", "--num-seqs", "2", "--elbo-steps", "2", "--overwrite")


def onto_a_read(name: str, argv: tuple[str, ...], target: str, setup: Setup = copy("R")) -> Case:
    """`argv` aimed at `target`, a file the command reads: refused naming it, nothing changed."""
    return Case("run-writes", name, argv, names=(target, READS), setup=setup, pristine=True)


def file_cases() -> list[Case]:
    """export, eval, compress and decompress writing onto their own inputs: the run's files (export --out
    R/model.pt with or without --overwrite), the artifact, the input file (as itself, through a symlink,
    through '..')."""
    cases = [onto_a_read("export --out RUN/model.pt", (*EXPORT, "--out", "{C}/R/model.pt"), "{C}/R/model.pt")]
    cases += [onto_a_read(f"export --out RUN/{name} --overwrite", (*EXPORT, "--out", f"{{C}}/R/{name}", "--overwrite"),
                          f"{{C}}/R/{name}") for name in RUN_FILES]
    return cases + [
        onto_a_read("export --json RUN/config.json --overwrite",
                    (*EXPORT, "--out", "{C}/A.bin", "--json", "{C}/R/config.json", "--overwrite"), "{C}/R/config.json"),
        onto_a_read("eval --json RUN/eval.json --overwrite",
                    (*EVAL, "--run", "{C}/R", "--json", "{C}/R/eval.json", "--overwrite"), "{C}/R/eval.json"),
        onto_a_read("eval --json RUN/model.pt --overwrite",
                    (*EVAL, "--run", "{C}/R", "--json", "{C}/R/model.pt", "--overwrite"), "{C}/R/model.pt"),
        onto_a_read("eval --json onto its --artifact --overwrite",
                    (*EVAL, "--artifact", "{C}/A.bin", "--json", "{C}/A.bin", "--overwrite"), "{C}/A.bin",
                    copy("A.bin")),
        onto_a_read("compress onto its input --overwrite",
                    ("compress", "--run", "{R}", "{C}/in.txt", "{C}/in.txt", "--overwrite"), "{C}/in.txt", TEXT),
        onto_a_read("compress onto a symlink to its input --overwrite",
                    ("compress", "--run", "{R}", "{C}/in.txt", "{C}/link.txt", "--overwrite"), "{C}/link.txt",
                    chain(TEXT, symlink("link.txt", "in.txt"))),
        onto_a_read("compress onto its input through '..' --overwrite",
                    ("compress", "--run", "{R}", "{C}/in.txt", "{C}/sub/../in.txt", "--overwrite"),
                    "{C}/sub/../in.txt", chain(TEXT, files({"sub": None}))),
        onto_a_read("compress onto RUN/model.pt --overwrite",
                    ("compress", "--run", "{C}/R", "{TXT}", "{C}/R/model.pt", "--overwrite"), "{C}/R/model.pt"),
        onto_a_read("decompress onto its input --overwrite",
                    ("decompress", "--run", "{R}", "{C}/x.mdz", "{C}/x.mdz", "--overwrite"), "{C}/x.mdz",
                    copy("text.mdz", "x.mdz")),
        onto_a_read("decompress onto RUN/config.json --overwrite",
                    ("decompress", "--run", "{C}/R", "{M}", "{C}/R/config.json", "--overwrite"), "{C}/R/config.json"),
    ]


def folder_cases() -> list[Case]:
    """submission --out naming (or holding) a folder it reads, even with --overwrite; a record folder is
    written whole or not at all (a run whose config.json is bad fails after the scoring: nothing written)."""
    reads = "which this command reads"
    return [
        Case("run-writes", "submission --out the --run folder", submission("{C}/R", "{A}", "{D}", "{C}/R"),
             names=("{C}/R", reads), setup=copy("R"), pristine=True),
        Case("run-writes", "submission --out a folder holding the --run folder",
             submission("{C}/W/R", "{A}", "{D}", "{C}/W"), names=("{C}/W", reads), setup=copy("R", "W/R"),
             pristine=True),
        Case("run-writes", "submission --out the artifact's folder",
             submission("{R}", "{C}/AF/A.bin", "{D}", "{C}/AF"), names=("{C}/AF", reads),
             setup=chain(files({"AF": None}), copy("A.bin", "AF/A.bin")), pristine=True),
        Case("run-writes", "submission --out the data folder", submission("{R}", "{A}", "{C}/D", "{C}/D"),
             names=("{C}/D", reads), setup=copy("D"), pristine=True),
        Case("run-writes", "submission: RUN/config.json not JSON, nothing written",
             submission("{C}/R", "{A}", "{D}", "{C}/S"), names="{C}/R/config.json",
             setup=config_json(lambda c: "{oops"), pristine=True),
        Case("run-writes", "submission: RUN/config.json a JSON list, the old record kept",
             submission("{C}/R", "{A}", "{D}", "{C}/S"), names="{C}/R/config.json",
             setup=chain(config_json(lambda c: "[]"), files({"S/submission.json": b'{"name": "old"}\n'})),
             pristine=True),
    ]


def run_write_cases() -> list[Slot]:
    return fixed([*file_cases(), *folder_cases()])


@pytest.mark.parametrize("slot", run_write_cases(), ids=slot_id)
def test_run_writes(slot: Slot, run_slot: Callable[[Slot], None]) -> None:
    run_slot(slot)
