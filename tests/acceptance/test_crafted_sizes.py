"""Acceptance battery, category "crafted-sizes": a size read from a file (an .mdz header's token count, an
artifact's or a checkpoint's config and tensor table, a shard header, a manifest) or given as a flag is
checked before anything is allocated for it: one line naming the file or field, exit 2, quickly, under an
address-space cap a giant allocation cannot pass (runner.py says how a case is judged)."""
from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from mdlm_golf.eval import Schedule

from .mutators import (ART_HEADER, artifact, chain, checkpoint, config_json, config_with, copy, edit, header_word,
                       manifest, mdz_header, meta_config, meta_tensor, meta_with, packed, shards)
from .runner import EXACT, TINY, Case, Slot, fixed, slot_id

MEMORY = 4 << 30  # the commands' address space: the tiny runs need well under 2 GiB
WITHIN = 60  # seconds: a start-up on a busy machine, not a giant allocation or loop
HUGE = 10 ** 12
WEIGHTS = "weights do not match its config"
SEQ_LEN = "seq_len must be in [1, 1048576]"
MDZ, ART, MODEL, CKPT = "{C}/x.mdz", "{C}/A.bin", "{C}/R/model.pt", "{C}/R/checkpoint.pt"
DEC = ("decompress", "--run", "{R}", MDZ, "{C}/out.txt")
EVAL_ART = ("eval", "--artifact", ART, "--data", "{D}", "--num-seqs", "2", "--elbo-steps", "2")
SAMPLE_ART = ("sample", "--artifact", ART, "--length", "8", "--steps", "2")
EVAL_RUN = ("eval", "--run", "{C}/R", "--data", "{D}", "--num-seqs", "2", "--elbo-steps", "2")
TRAIN = ("train", "--data", "{D}", "--out", "{C}/R", *TINY, "--steps", "1", "--no-eval")


def json_with(**changes) -> Callable[[bytes], bytes]:
    """A JSON object's bytes with these fields changed."""
    return lambda data: json.dumps({**json.loads(data), **changes}).encode()


def crafted(name: str, argv: tuple[str, ...], names: str | tuple[str, ...], **options) -> Case:
    """A crafted size: refused (or, for an .mdz, `expect=EXACT`), within WITHIN seconds and MEMORY bytes."""
    return Case("crafted-sizes", name, argv, names=names, memory=MEMORY, within=WITHIN, **options)


def mdz_cases() -> list[Case]:
    """Header fields re-encoded with a valid CRC: a huge token count, row length, batch, schedule, escape
    section. Refused, or (a field that does not change the decoding) the original rebuilt exactly."""
    claims = "corrupted header: it claims"
    fields = [("claims 2**44 tokens", claims, dict(num_tokens=2 ** 44)),
              ("claims 2**63 tokens", claims, dict(num_tokens=2 ** 63)),
              ("seq_len 2**40", "", dict(seq_len=2 ** 40)), ("seq_len 2**20", "", dict(seq_len=2 ** 20)),
              ("batch_rows 2**40", "", dict(batch_rows=2 ** 40)),
              ("passes 2**40", "", dict(schedule=Schedule(None, 2 ** 40))),
              ("tokens per pass 2**40", "", dict(schedule=Schedule(2 ** 40, None))),
              ("escape section 2**40 bytes", "", dict(escape_len=2 ** 40))]
    return [crafted(f".mdz header: {what}", DEC, (MDZ, says), expect=EXACT, output="out.txt", corrupt=True,
                    setup=chain(copy("text.mdz", "x.mdz"), edit("x.mdz", mdz_header(**changes))))
            for what, says, changes in fields]


def artifact_cases() -> list[Case]:
    """Artifacts re-sealed (CRC fixed) around a config or tensor table claiming far more than they hold."""
    return [
        crafted("artifact: config seq_len 10**12", EVAL_ART, (ART, SEQ_LEN), corrupt=True,
                setup=artifact(meta_config(seq_len=HUGE))),
        crafted("artifact: config 1000 layers", EVAL_ART, (ART, WEIGHTS), corrupt=True,
                setup=artifact(meta_config(num_layers=1000))),
        crafted("artifact: config width 4096, 8 heads", SAMPLE_ART, (ART, WEIGHTS), corrupt=True,
                setup=artifact(meta_config(model_dim=4096, num_heads=8))),
        crafted("artifact: config vocab 65533", EVAL_ART, (ART, WEIGHTS), corrupt=True,
                setup=artifact(meta_config(vocab_size=65533))),
        crafted("artifact: config mlp_mult 64", SAMPLE_ART, (ART, WEIGHTS), corrupt=True,
                setup=artifact(meta_config(mlp_mult=64))),
        crafted("artifact: a tensor shaped 2**40 x 2**20", EVAL_ART, ART, corrupt=True,
                setup=artifact(meta_tensor(shape=[2 ** 40, 2 ** 20]))),
        crafted("artifact: a tensor storing 2**40 rows", EVAL_ART, ART, corrupt=True,
                setup=artifact(meta_tensor(rows=2 ** 40))),
        crafted("artifact: payload_bytes 2**60", EVAL_ART, ART, corrupt=True,
                setup=artifact(meta_with(payload_bytes=2 ** 60))),
        crafted("artifact: metadata length 2**32 - 1", EVAL_ART, ART, corrupt=True,
                setup=chain(copy("A.bin"), edit("A.bin", packed(ART_HEADER.size - 4, "<I", 2 ** 32 - 1)))),
    ]


def checkpoint_cases() -> list[Case]:
    """Sealed checkpoints (and a run's config.json) whose config claims a much larger model than its tensors."""
    resume = ("train", "--resume", "{C}/R", "--data", "{D}", "--no-eval")
    return [
        crafted("checkpoint: config 1000 layers (eval)", EVAL_RUN, (MODEL, WEIGHTS), corrupt=True,
                setup=checkpoint("model.pt", config_with(num_layers=1000))),
        crafted("checkpoint: config width 4096, 8 heads (sample)", ("sample", "--run", "{C}/R", "--length", "8",
                                                                     "--steps", "2"),
                (MODEL, WEIGHTS), corrupt=True, setup=checkpoint("model.pt", config_with(model_dim=4096, num_heads=8))),
        crafted("checkpoint: config seq_len 10**12 (export)", ("export", "--run", "{C}/R", "--out", "{C}/A.bin"),
                (MODEL, SEQ_LEN), corrupt=True, setup=checkpoint("model.pt", config_with(seq_len=HUGE))),
        crafted("checkpoint: config vocab 65533 (compress)", ("compress", "--run", "{C}/R", "{TXT}", "{C}/x.mdz"),
                (MODEL, WEIGHTS), corrupt=True, setup=checkpoint("model.pt", config_with(vocab_size=65533))),
        # config.json says so too: otherwise the resume refuses the disagreement before reading any weight
        crafted("checkpoint.pt: config 1000 layers (resume)", resume, (CKPT, WEIGHTS), corrupt=True,
                setup=chain(checkpoint("checkpoint.pt", config_with(num_layers=1000)),
                            edit("R/config.json", json_with(num_layers=1000)))),
        crafted("resume: config.json seq_len 10**12", resume, ("{C}/R/config.json", SEQ_LEN), corrupt=True,
                setup=config_json(lambda c: json.dumps({**c, "seq_len": HUGE}))),
    ]


def data_cases() -> list[Case]:
    """Shard headers and a manifest claiming 2**31 - 1 or 2**62 tokens."""
    val = ("eval", "--run", "{R}", "--data", "{C}/D", "--num-seqs", "2", "--elbo-steps", "2")
    train = ("train", "--data", "{C}/D", "--out", "{C}/R", *TINY, "--steps", "1", "--no-eval")
    return [
        crafted("val shard header: 2**31 - 1 tokens", val, "{C}/D/fineweb_val_000000.bin", corrupt=True,
                setup=shards("val", header_word(2, 2 ** 31 - 1))),
        crafted("val shard header: -2**31 tokens", val, "{C}/D/fineweb_val_000000.bin", corrupt=True,
                setup=shards("val", header_word(2, -2 ** 31))),
        crafted("train shard headers: 2**31 - 1 tokens", train, "{C}/D/fineweb_train_", corrupt=True,
                setup=shards("train", header_word(2, 2 ** 31 - 1), every=True)),
        crafted("manifest: the val split records 2**62 tokens", val, "{C}/D/manifest.json", corrupt=True,
                setup=manifest(lambda m: json.dumps({**m, "val": {**m["val"], "tokens": 2 ** 62}}))),
        crafted("manifest: the train split records 2**62 tokens", train, "{C}/D/manifest.json", corrupt=True,
                setup=manifest(lambda m: json.dumps({**m, "train": {**m["train"], "tokens": 2 ** 62}}))),
    ]


def flag_cases() -> list[Case]:
    """Sizes given on the command line or in the environment, far past what any run could allocate."""
    experiment = ("--data", "{D}", "--out", "{C}/O", *TINY, "--steps", "1")
    return [
        crafted("train --seq-len 10**12", (*TRAIN, "--seq-len", str(HUGE)), "seq_len", pristine=True),
        crafted("train env SEQ_LEN=10**12", TRAIN, "seq_len", env=(("SEQ_LEN", str(HUGE)),), pristine=True),
        crafted("train --batch-rows 10**12", (*TRAIN, "--batch-rows", str(HUGE)), "batch_rows", pristine=True),
        crafted("train --num-layers 10**6", (*TRAIN, "--num-layers", str(10 ** 6)), "num_layers", pristine=True),
        crafted("train --model-dim 2**20", (*TRAIN, "--model-dim", str(2 ** 20)), "model_dim", pristine=True),
        crafted("eval --batch-rows 10**12", (*EVAL_RUN[:2], "{R}", *EVAL_RUN[3:], "--batch-rows", str(HUGE)),
                "batch_rows", pristine=True),
        crafted("sample --num 10**9", ("sample", "--run", "{R}", "--length", "16", "--steps", "2", "--num",
                                       str(10 ** 9)), "--num", pristine=True),
        crafted("race --recipe x:seq_len=10**12", ("race", "--recipe", f"x:seq_len={HUGE}", "--seeds", "1",
                                                   *experiment), ("recipe 'x'", "seq_len"), pristine=True),
        crafted("ablate --param seq_len --values 10**12", ("ablate", "--param", "seq_len", "--values", str(HUGE),
                                                           *experiment), "seq_len", pristine=True),
    ]


def crafted_size_cases() -> list[Slot]:
    return fixed([*mdz_cases(), *artifact_cases(), *checkpoint_cases(), *data_cases(), *flag_cases()])


@pytest.mark.parametrize("slot", crafted_size_cases(), ids=slot_id)
def test_crafted_sizes(slot: Slot, run_slot: Callable[[Slot], None]) -> None:
    run_slot(slot)
