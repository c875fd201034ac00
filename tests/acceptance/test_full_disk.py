"""Acceptance battery, category "full-disk": every write on a full disk (a small tmpfs at {C}/disk, filled
but for a few bytes) is one line naming the file and "No space left on device", exit 2, with the previous
version of what it wrote intact and no temporary left (runner.py says how a case is judged; the category
is skipped where a tmpfs cannot be mounted)."""
from __future__ import annotations

from collections.abc import Callable

import pytest

from .mutators import chain, copy, copy_file, files, no_temp_anywhere
from .runner import FIXTURE_DOCS, TINY, Case, Slot, fixed, slot_id

ENOSPC = "No space left on device"
LOGS_ONLY = 200_000  # room for a run's config and logs, not for a tiny model's 3 MB checkpoint.pt
OLD = b"the previous version, to be kept\n"


def full(name: str, argv: tuple[str, ...], names: str, free: int = 0, **options) -> Case:
    """A write onto a full disk: refused naming `names` and the full disk, no temporary left."""
    return Case("full-disk", name, argv, names=(names, ENOSPC), disk_free=free, check=no_temp_anywhere, **options)


def artifact_cases() -> list[Case]:
    """export, eval --json, compress, decompress and submission writing onto the full disk."""
    export = ("export", "--run", "{R}", "--out")
    submission = ("submission", "--run", "{R}", "--artifact", "{A}", "--data", "{D}", "--name", "x",
                  "--github-id", "y", "--num-seqs", "2", "--elbo-steps", "2", "--out", "{C}/disk/S")
    return [
        full("export --out onto a full disk", (*export, "{C}/disk/A.bin"), "{C}/disk/A.bin"),
        full("export --overwrite: the old artifact kept", (*export, "{C}/disk/A.bin", "--overwrite"),
             "{C}/disk/A.bin", setup=copy("A.bin", "disk/A.bin")),
        full("export --json onto a full disk", (*export, "{C}/A.bin", "--json", "{C}/disk/r.json"),
             "{C}/disk/r.json", mutable=("A.bin",)),
        full("eval --json onto a full disk", ("eval", "--run", "{R}", "--data", "{D}", "--num-seqs", "2",
                                              "--elbo-steps", "2", "--json", "{C}/disk/e.json"), "{C}/disk/e.json"),
        full("compress onto a full disk", ("compress", "--run", "{R}", "{TXT}", "{C}/disk/x.mdz"), "{C}/disk/x.mdz"),
        full("compress --overwrite: the old .mdz kept", ("compress", "--run", "{R}", "{TXT}", "{C}/disk/x.mdz",
                                                         "--overwrite"),
             "{C}/disk/x.mdz", setup=copy("text.mdz", "disk/x.mdz")),
        full("decompress --overwrite: the old file kept", ("decompress", "--run", "{R}", "{M}", "{C}/disk/out.txt",
                                                           "--overwrite"),
             "{C}/disk/out.txt", setup=files({"disk/out.txt": OLD})),
        full("submission --out onto a full disk", submission, "{C}/disk/S"),
        full("submission --overwrite: the old record kept", (*submission, "--overwrite"), "{C}/disk/S",
             setup=files({"disk/S/submission.json": b'{"name": "old"}\n', "disk/S/README.md": OLD})),
    ]


def data_cases() -> list[Case]:
    """prepare's shards and manifest, and a run's config, logs and checkpoints, onto the full disk."""
    prepare = ("prepare", "--docs", "{DOCS}", "--tokenizer", "{T}", "--out", "{C}/disk/D", "--val-docs", "20",
               "--shard-tokens", "20000")
    train = ("train", "--data", "{D}", "--out", "{C}/disk/R", *TINY, "--steps", "4", "--checkpoint-every", "2",
             "--no-eval")
    resume = ("train", "--resume", "{C}/disk/R", "--data", "{D}", "--steps", "6", "--checkpoint-every", "1",
              "--no-eval")
    experiment = ("--data", "{D}", "--out", "{C}/disk/O", *TINY, "--steps", "2", "--eval-num-seqs", "2",
                  "--elbo-steps", "2")
    return [
        full("prepare --out onto a full disk", prepare, "{C}/disk/D/"),
        full("prepare: room for some shards only", prepare, "{C}/disk/D/fineweb_", free=60_000),
        # four times the docs of the old folder: the new shards cannot fit where the old ones were
        full("prepare --overwrite: the old data folder kept", ("prepare", "--docs", "{C}/all.jsonl", *prepare[3:],
                                                               "--overwrite"),
             "{C}/disk/D/", setup=chain(copy("D", "disk/D"), copy_file(FIXTURE_DOCS, "all.jsonl"))),
        full("train --out onto a full disk", train, "{C}/disk/R/"),
        full("train: room for the logs, not the checkpoint", train, "{C}/disk/R/checkpoint.pt", free=LOGS_ONLY),
        full("train --overwrite: the old run kept", (*train, "--overwrite"), "{C}/disk/R/", free=LOGS_ONLY,
             setup=copy("R", "disk/R")),
        # the resumed run may add to its own logs; its checkpoint and model must stay as they were
        full("train --resume: no room for the next checkpoint, the old one kept", resume,
             "{C}/disk/R/checkpoint.pt", free=LOGS_ONLY, setup=copy("R", "disk/R"),
             mutable=("disk/R/train.log", "disk/R/metrics.jsonl", "disk/R/config.json")),
        full("ablate --out onto a full disk", ("ablate", "--param", "lr", "--values", "1e-3", *experiment),
             "{C}/disk/O"),
        full("race: room for the logs, not the checkpoint", ("race", "--recipes", "today", "--seeds", "1",
                                                             *experiment, "--checkpoint-every", "1"),
             "{C}/disk/O/", free=LOGS_ONLY),
    ]


def full_disk_cases() -> list[Slot]:
    return fixed([*artifact_cases(), *data_cases()])


@pytest.mark.parametrize("slot", full_disk_cases(), ids=slot_id)
def test_full_disk(slot: Slot, run_slot: Callable[[Slot], None]) -> None:
    run_slot(slot)
