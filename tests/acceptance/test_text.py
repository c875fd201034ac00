"""Acceptance battery, category "text": free-text flags a shell hands over as bytes that are not UTF-8 are
refused in one line naming the flag, before anything is written; UTF-8 text of any script, and file names
that are not UTF-8 (legal on Linux), work (runner.py says how a case is judged)."""
from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from .mutators import checks, exists, files, json_field
from .runner import OK, TINY, Case, Slot, fixed, slot_id

# bytes a shell may pass that are not UTF-8, as subprocess passes them (os.fsdecode: surrogate escapes)
LATIN1, BINARY, SURROGATE, CUT = (os.fsdecode(b) for b in (b"caf\xe9", b"\xff\xfe", b"\xed\xa0\x80", b"caf\xc3"))
UNICODE = "café Zoë 中文 🙂"
SAMPLE = ("sample", "--run", "{R}", "--length", "16", "--steps", "4")
EXPERIMENT = ("--data", "{D}", "--out", "{C}/O", *TINY, "--steps", "1")


def submission(name: str = "x", github_id: str = "y", *extra: str) -> tuple[str, ...]:
    return ("submission", "--run", "{R}", "--artifact", "{A}", "--data", "{D}", "--out", "{C}/S", "--name", name,
            "--github-id", github_id, "--num-seqs", "2", "--elbo-steps", "2", *extra)


def refused(what: str, argv: tuple[str, ...], flag: str) -> Case:
    return Case("text", what, argv, names=(f"argument {flag}", "not valid UTF-8"), pristine=True)


def text_cases() -> list[Slot]:
    """Every text flag with bytes that are not UTF-8; UTF-8 prompts, names and file names that must work."""
    bad = [refused(f"sample --prompt {label}", (*SAMPLE, "--prompt", value), "--prompt")
           for label, value in (("latin-1", LATIN1), ("binary", BINARY), ("an encoded surrogate", SURROGATE),
                                ("cut mid-character", CUT))]
    bad += [refused("submission --name latin-1", submission(LATIN1), "--name"),
            refused("submission --github-id binary", submission("x", BINARY), "--github-id"),
            refused("submission --hardware latin-1", submission("x", "y", "--hardware", LATIN1), "--hardware"),
            refused("race --recipe latin-1", ("race", "--recipe", f"x:lr={LATIN1}", "--seeds", "1", *EXPERIMENT),
                    "--recipe"),
            refused("race --recipes binary", ("race", "--recipes", f"today,{BINARY}", "--seeds", "1", *EXPERIMENT),
                    "--recipes"),
            refused("ablate --param latin-1", ("ablate", "--param", LATIN1, "--values", "1", *EXPERIMENT),
                    "--param"),
            refused("ablate --values binary", ("ablate", "--param", "lr", "--values", f"1e-3,{BINARY}",
                                               *EXPERIMENT), "--values")]
    good = [
        Case("text", "sample --prompt in several scripts", (*SAMPLE, "--prompt", UNICODE), expect=OK),
        Case("text", "sample --prompt with terminal escapes", (*SAMPLE, "--prompt", "\x1b[31mred\x1b[0m\ttab"),
             expect=OK),
        Case("text", "submission --name and --github-id in several scripts", submission(UNICODE, "ünïcødé"),
             expect=OK, check=checks(json_field("S/submission.json", "name", UNICODE),
                                     json_field("S/submission.json", "github_id", "ünïcødé"))),
        Case("text", "export --out a file name that is not UTF-8", ("export", "--run", "{R}", "--out",
                                                                     f"{{C}}/{LATIN1}.bin"),
             expect=OK, check=exists(f"{LATIN1}.bin")),
        Case("text", "compress a file whose name is not UTF-8", ("compress", "--run", "{R}", f"{{C}}/{BINARY}.txt",
                                                                  "{C}/x.mdz"),
             expect=OK, setup=files({f"{BINARY}.txt": b"text under a name that is not UTF-8\n"}),
             check=exists("x.mdz")),
    ]
    return fixed([*bad, *good])


@pytest.mark.parametrize("slot", text_cases(), ids=slot_id)
def test_text(slot: Slot, run_slot: Callable[[Slot], None]) -> None:
    run_slot(slot)
