"""Acceptance battery, category "overwrite" (runner.py says how a case is judged)."""
from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from .mutators import (chain, checks, config_json, copy, edit, exists, files, header_word, model_at, no_temp_anywhere,
                       same_as, shards)
from .runner import OK, TINY, Case, Slot, fixed, slot_id


def overwrite_cases() -> list[Slot]:
    """Nothing lost: a run folder, a data folder, a resumed run's config, an output file or record folder
    are refused unless asked for."""
    new_run = ("train", "--data", "{D}", "--out", "{C}/R", *TINY, "--steps", "2", "--no-eval")
    resume = ("train", "--resume", "{C}/R", "--data", "{D}", "--no-eval")
    return fixed([
        Case("overwrite", "train --out onto a finished run", new_run, names="--overwrite", setup=copy("R")),
        Case("overwrite", "train --out onto a run, --overwrite but a bad flag", (*new_run, "--overwrite",
                                                                                 "--steps", "-1"),
             names="steps", setup=copy("R")),
        Case("overwrite", "train --out onto a run, --overwrite but an unknown objective",
             (*new_run, "--overwrite", "--objective", "foo"), names="objective", setup=copy("R")),
        Case("overwrite", "train --out onto a run, --overwrite but missing data",
             ("train", "--data", "{C}/nodata", "--out", "{C}/R", *TINY, "--overwrite"), names="{C}/nodata",
             setup=copy("R")),
        Case("overwrite", "train --out onto a run, --overwrite but a missing --tokenizer",
             (*new_run, "--overwrite", "--tokenizer", "{C}/nope.model"), names="{C}/nope.model", setup=copy("R")),
        Case("overwrite", "train --out onto a run, --overwrite but corrupt train shards",
             ("train", "--data", "{C}/D", "--out", "{C}/R", *TINY, "--steps", "2", "--no-eval", "--overwrite"),
             names="{C}/D/fineweb_train_", setup=chain(copy("R"), shards("train", header_word(0, 1), every=True))),
        Case("overwrite", "prepare --overwrite, but the docs file is missing",
             ("prepare", "--docs", "{C}/nope.jsonl", "--tokenizer", "{T}", "--out", "{C}/D", "--val-docs", "20",
              "--overwrite"), names="{C}/nope.jsonl", setup=copy("D")),
        Case("overwrite", "prepare --overwrite, but the tokenizer is missing",
             ("prepare", "--docs", "{DOCS}", "--tokenizer", "{C}/nope.model", "--out", "{C}/D", "--val-docs", "20",
              "--overwrite"), names="{C}/nope.model", setup=copy("D")),
        Case("overwrite", "prepare --overwrite, but a bad line late in the docs",
             ("prepare", "--docs", "{C}/docs.jsonl", "--tokenizer", "{T}", "--out", "{C}/D", "--val-docs", "20",
              "--overwrite"), names="{C}/docs.jsonl",
             setup=chain(copy("D"), copy("docs.jsonl"), edit("docs.jsonl", lambda d: d + b"not json\n"))),
        Case("overwrite", "train --out onto a run that only has train.log", new_run, names="--overwrite",
             setup=files({"R/train.log": b"an old log I want\n"})),
        Case("overwrite", "resume: config.json model_dim changed", resume, names="model_dim",
             setup=config_json(lambda c: json.dumps({**c, "model_dim": 128}))),
        Case("overwrite", "resume: config.json not JSON", resume, names="{C}/R/config.json",
             setup=config_json(lambda c: "{oops")),
        Case("overwrite", "resume: config.json a JSON list", resume, names="{C}/R/config.json",
             setup=config_json(lambda c: "[]")),
        Case("overwrite", "resume: a model flag changed", (*resume, "--num-layers", "3"), names="num_layers",
             setup=copy("R")),
        Case("overwrite", "resume: an out-of-range flag", (*resume, "--steps", "0"), names="steps",
             setup=copy("R")),
        Case("overwrite", "resume: fewer steps than done", (*resume, "--steps", "2"), names="--steps 2",
             setup=copy("R")),
        Case("overwrite", "resume: config.json steps changed (allowed)", (*resume, "--steps", "6"), expect=OK,
             setup=config_json(lambda c: json.dumps({**c, "steps": 9})), mutable=("R/",),
             check=model_at("R/model.pt", 6)),
        Case("overwrite", "--resume and --out together", ("train", "--resume", "{C}/R", "--out", "{C}/R2",
                                                          "--data", "{D}", "--no-eval"),
             names="--out {C}/R2", setup=copy("R")),
        # the user's own command with --resume added: --out names the folder being resumed, so it resumes
        Case("overwrite", "--resume and --out the same folder", (*resume, "--out", "{C}/R", "--steps", "6"), expect=OK,
             setup=copy("R"), mutable=("R/",), check=model_at("R/model.pt", 6)),
        Case("overwrite", "--resume and --overwrite together", (*resume, "--overwrite"), names="--resume {C}/R",
             setup=copy("R")),
        *output_cases(),
    ])


MINE = b"my precious file\n"


def output_cases() -> list[Case]:
    """A file or record folder already at an output path: refused before any work, naming it and
    --overwrite, with nothing written; with --overwrite it is replaced whole (no temporary left)."""
    export = ("export", "--run", "{R}", "--out", "{C}/A.bin")
    evals = ("eval", "--run", "{R}", "--data", "{D}", "--num-seqs", "2", "--elbo-steps", "2", "--json", "{C}/e.json")
    compress = ("compress", "--run", "{R}", "{TXT}", "{C}/x.mdz")
    decompress = ("decompress", "--run", "{R}", "{M}", "{C}/out.txt")
    submission = ("submission", "--run", "{R}", "--artifact", "{A}", "--data", "{D}", "--out", "{C}/S", "--name",
                  "x", "--github-id", "y", "--num-seqs", "2", "--elbo-steps", "2")
    refused = [("export --out", export, "A.bin"), ("export --json", (*export, "--json", "{C}/r.json"), "r.json"),
               ("eval --json", evals, "e.json"), ("compress", compress, "x.mdz"),
               ("decompress", decompress, "out.txt")]
    cases = [Case("overwrite", f"{what} onto an existing file", argv, names=(f"{{C}}/{rel}", "--overwrite"),
                  setup=files({rel: MINE}), pristine=True) for what, argv, rel in refused]
    return cases + [
        Case("overwrite", "submission --out a folder holding files", submission, names=("{C}/S", "--overwrite"),
             setup=files({"S/notes.txt": MINE}), pristine=True),
        Case("overwrite", "submission --out an empty folder", submission, expect=OK, setup=files({"S": None}),
             check=checks(exists("S/submission.json"), no_temp_anywhere)),
        Case("overwrite", "submission --overwrite replaces a record folder", (*submission, "--overwrite"),
             expect=OK, setup=files({"S/old.txt": MINE}), mutable=("S/",),
             check=checks(exists("S/submission.json"), no_temp_anywhere)),
        Case("overwrite", "compress --overwrite onto an existing file", (*compress, "--overwrite"), expect=OK,
             setup=files({"x.mdz": MINE}), mutable=("x.mdz",), check=checks(exists("x.mdz"), no_temp_anywhere)),
        Case("overwrite", "decompress --overwrite onto an existing file", (*decompress, "--overwrite"), expect=OK,
             setup=files({"out.txt": MINE}), mutable=("out.txt",), check=checks(same_as("out.txt", "text.txt"),
                                                                                 no_temp_anywhere)),
        Case("overwrite", "eval --json --overwrite onto an existing file", (*evals, "--overwrite"), expect=OK,
             setup=files({"e.json": MINE}), mutable=("e.json",), check=no_temp_anywhere),
        Case("overwrite", "compress --overwrite onto a folder", (*compress[:-1], "{C}/F", "--overwrite"),
             names="{C}/F", setup=files({"F/keep.txt": MINE}), pristine=True),
    ]


@pytest.mark.parametrize("slot", overwrite_cases(), ids=slot_id)
def test_overwrite(slot: Slot, run_slot: Callable[[Slot], None]) -> None:
    run_slot(slot)
