"""Acceptance battery, category "flags" (runner.py says how a case is judged)."""
from __future__ import annotations

from collections.abc import Callable

import pytest

from .runner import CLEAN, TINY, Case, Slot, fixed, slot_id


def flag_cases() -> list[Slot]:
    """Every numeric flag out of range, nan/inf, non-numbers, unknown enum values: exit 2, naming the flag,
    before anything is written."""
    train = ("train", "--data", "{D}", "--out", "{C}/R", *TINY, "--steps", "2", "--no-eval")
    bad_train = [("steps", "0"), ("steps", "-5"), ("steps", "1.5"), ("steps", "abc"), ("steps", ""),
                 ("elbo-steps", "0"), ("max-wallclock", "-1"), ("max-wallclock", "nan"),
                 ("warmup-steps", "-1"), ("warmdown-steps", "-1"), ("checkpoint-every", "-1"),
                 ("vocab-size", "0"), ("vocab-size", "70000"), ("lr", "-1"), ("lr", "0"), ("lr", "nan"),
                 ("lr", "inf"), ("lr", "-inf"), ("lr", "1e999"), ("lr", "abc"), ("batch-rows", "0"),
                 ("grad-accum", "0"), ("seq-len", "0"), ("num-layers", "0"), ("model-dim", "0"),
                 ("num-heads", "0"), ("model-dim", "65"), ("mlp-mult", "0"), ("cond-dim", "0"), ("ema", "1"),
                 ("ema", "-0.5"), ("noise-eps", "0"), ("noise-eps", "1"), ("anchor-mask-prob", "2"),
                 ("weight-decay", "-1"), ("grad-clip", "0"), ("seed", "-1"), ("seed", "4294967296"),
                 ("log-every", "0"), ("eval-num-seqs", "-1"), ("eval-batch-rows", "0"), ("val-every", "-1"),
                 ("block-size", "7"), ("block-size", "-1"), ("shards-per-group", "0"), ("muon-lr", "0"),
                 ("time-cond", "maybe"), ("compile", "sometimes"), ("objective", "foo"),
                 ("optimizer", "foo"), ("layout", "foo")]
    unnamed = {("model-dim", "65")}  # width not divisible by the heads: either field may be named
    cases = [Case("flags", f"train --{flag} {value or 'EMPTY'}", (*train, f"--{flag}", value),
                  names="" if (flag, value) in unnamed else flag.replace("-", "_"), pristine=True)
             for flag, value in bad_train]
    cases += [Case("flags", "train --preset foo", (*train, "--preset", "foo"), names="--preset", pristine=True),
              Case("flags", "train env STEPS=-1", train[:-3] + ("--no-eval",), names="steps", pristine=True,
                   env=(("STEPS", "-1"),)),
              Case("flags", "train env LR=nan", train, names="lr", pristine=True, env=(("LR", "nan"),)),
              Case("flags", "train env SEQ_LEN=abc", train, names="seq_len", pristine=True,
                   env=(("SEQ_LEN", "abc"),)),
              Case("flags", "train without --out or --resume", ("train", "--data", "{D}"), names="--out",
                   pristine=True)]
    evals = ("eval", "--run", "{R}", "--data", "{D}", "--num-seqs", "2", "--elbo-steps", "2")
    bad_eval = [("--batch-rows", "0"), ("--draws", "0"), ("--draws", "-1"), ("--elbo-steps", "0"),
                ("--elbo-steps", "abc"), ("--num-seqs", "-1"), ("--seed", "-1"), ("--grid", "foo"),
                ("--mode", "foo"), ("--method", "foo"), ("--order", "foo")]
    cases += [Case("flags", f"eval {flag} {value}", (*evals, flag, value), names=flag, pristine=True)
              for flag, value in bad_eval]
    planned = (*evals, "--method", "planned")
    cases += [Case("flags", "eval --passes 0", (*planned, "--passes", "0"), names="--passes", pristine=True),
              Case("flags", "eval --tokens-per-pass 0", (*planned, "--tokens-per-pass", "0"),
                   names="--tokens-per-pass", pristine=True),
              Case("flags", "eval --passes with --tokens-per-pass", (*planned, "--passes", "2",
                                                                      "--tokens-per-pass", "2"),
                   names="--tokens-per-pass", pristine=True),
              Case("flags", "eval --run with --artifact", (*evals, "--artifact", "{A}"), names="--artifact",
                   pristine=True),
              Case("flags", "eval --num-seqs beyond the split", (*evals[:-4], "--num-seqs", "100000",
                                                                 "--elbo-steps", "1"), expect=CLEAN)]
    sample = ("sample", "--run", "{R}", "--length", "16", "--steps", "4")
    bad_sample = [("--length", "1"), ("--length", "0"), ("--length", "100000"), ("--steps", "0"), ("--num", "0"),
                  ("--temperature", "0"), ("--temperature", "-1"), ("--temperature", "nan"), ("--top-p", "0"),
                  ("--top-p", "1.5"), ("--top-p", "nan"), ("--seed", "-1"), ("--sampler", "foo")]
    cases += [Case("flags", f"sample {flag} {value}", (*sample, flag, value),
                   names="length" if value == "100000" else flag, pristine=True) for flag, value in bad_sample]
    export = ("export", "--run", "{R}", "--out", "{C}/A.bin")
    bad_export = [("--quant", "foo", "foo"), ("--quant", "int3", "int3"), ("--quant", "embed=int9", "int9"),
                  ("--quant", "bogus=int8", "bogus"), ("--compressor", "foo", "--compressor"),
                  ("--small-numel", "-1", "--small-numel"), ("--method", "foo", "--method"),
                  ("--layout", "foo", "--layout")]
    cases += [Case("flags", f"export {flag} {value}", (*export, flag, value), names=named, pristine=True)
              for flag, value, named in bad_export]
    cases += [Case("flags", "export --method gptq without --data", (*export, "--method", "gptq"),
                   names="calibration data", pristine=True)]
    compress = ("compress", "--run", "{R}", "{TXT}", "{C}/x.mdz")
    cases += [Case("flags", f"compress {flag} {value}", (*compress, flag, value), names=flag, pristine=True)
              for flag, value in [("--passes", "0"), ("--passes", "-3"), ("--tokens-per-pass", "0"),
                                  ("--mode", "foo"), ("--order", "foo")]]
    prepare = ("prepare", "--docs", "{DOCS}", "--tokenizer", "{T}", "--out", "{C}/D", "--val-docs", "20")
    cases += [Case("flags", f"prepare {flag} {value}", (*prepare, flag, value), names=flag, pristine=True)
              for flag, value in [("--val-docs", "0"), ("--val-docs", "-1"), ("--shard-tokens", "0"),
                                  ("--vocab-size", "0"), ("--vocab-size", "3"), ("--val-docs", "abc")]]
    cases += [Case("flags", "prepare --val-docs beyond the docs", (*prepare, "--val-docs", "100000"),
                   names="{DOCS}", pristine=True),
              Case("flags", "download --train-shards -1", ("download", "--train-shards", "-1", "--out", "{C}/dl"),
                   names="--train-shards", pristine=True),
              Case("flags", "download --train-shards abc", ("download", "--train-shards", "abc",
                                                            "--out", "{C}/dl"), names="--train-shards",
                   pristine=True)]
    sub = ("submission", "--run", "{R}", "--artifact", "{A}", "--data", "{D}", "--out", "{C}/S", "--name", "x",
           "--github-id", "y")
    cases += [Case("flags", f"submission {flag} {value}", (*sub, flag, value), names=flag, pristine=True)
              for flag, value in [("--num-seqs", "-1"), ("--elbo-steps", "0"), ("--seed", "-1")]]
    ablate = ("ablate", "--data", "{D}", "--out", "{C}/O", *TINY, "--steps", "1")
    cases += [Case("flags", "ablate --param foo", (*ablate, "--param", "foo", "--values", "1,2"), names="foo",
                   pristine=True),
              Case("flags", "ablate --values a,b", (*ablate, "--param", "num_heads", "--values", "a,b"),
                   names="num_heads", pristine=True),
              Case("flags", "ablate --values empty", (*ablate, "--param", "num_heads", "--values", ""),
                   names="num_heads", pristine=True),
              Case("flags", "ablate --values 0", (*ablate, "--param", "num_heads", "--values", "0"),
                   names="num_heads", pristine=True),
              Case("flags", "ablate --seeds 1,-2", (*ablate, "--param", "lr", "--values", "1e-3",
                                                    "--seeds", "1,-2"), names="seed", pristine=True),
              Case("flags", "race --recipes foo", ("race", "--data", "{D}", "--out", "{C}/O", *TINY,
                                                   "--recipes", "foo"), names="foo", pristine=True),
              Case("flags", "race --recipe bad syntax", ("race", "--data", "{D}", "--out", "{C}/O", *TINY,
                                                         "--recipe", "nocolon"), names="nocolon", pristine=True),
              Case("flags", "race --recipe unknown field", ("race", "--data", "{D}", "--out", "{C}/O", *TINY,
                                                            "--recipe", "x:bogus_field=3"), names="bogus_field",
                   pristine=True),
              Case("flags", "race --seeds x", ("race", "--data", "{D}", "--out", "{C}/O", *TINY, "--seeds", "x"),
                   names="'x'", pristine=True),
              Case("flags", "unknown command", ("frobnicate",), names="frobnicate", pristine=True),
              Case("flags", "no command", (), names="command", pristine=True)]
    return fixed(cases)


@pytest.mark.parametrize("slot", flag_cases(), ids=slot_id)
def test_flags(slot: Slot, run_slot: Callable[[Slot], None]) -> None:
    run_slot(slot)
