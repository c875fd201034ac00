"""The record evaluation's time on 8 H100s, projected from FLOPs: how many ELBO steps fit the budget.

    python bench/eval_budget.py [--preset record] [--val-tokens 62000000] [--devices 8] [--mfu 0.2,0.3,0.4]

One ELBO step runs the network forward once over every val token: forward FLOPs per token-position =
a third of the training formula (2 N_matmul + 4 n_layers d_model seq_len: dense attention, an upper
bound where FlexAttention skips other documents' tiles). At a given MFU on `devices` cards of the
H100's dense bf16 peak, the whole split costs S seconds per step; the steps that fit the challenge's
600 s less 20% spare are printed beside the preset's elbo_steps. Measured, not projected, by the record
script itself (eval.plan_elbo_steps) on the record machine; this table is what chose the preset's value
without a GPU.
"""
from __future__ import annotations

import argparse

from mdlm_golf.config import build_config
from mdlm_golf.eval.budget import EVAL_BUDGET_SECONDS, EVAL_SPARE
from mdlm_golf.model import Transformer
from mdlm_golf.train.runlog import PEAK_FLOPS

VAL_TOKENS = 62_000_000  # the FineWeb val split, ~62M SP-1024 tokens (as bench/speed.py)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="record")
    parser.add_argument("--val-tokens", type=int, default=VAL_TOKENS)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--mfu", default="0.15,0.2,0.3,0.4")
    args = parser.parse_args()
    cfg = build_config(args.preset, environ={})
    model = Transformer(cfg)
    forward = model.flops_per_token() / 3
    budget = EVAL_BUDGET_SECONDS * (1 - EVAL_SPARE)
    print(f"preset {args.preset}: {model.num_params():,} parameters, {forward / 1e6:.1f} MFLOP per token-forward "
          f"({model.flop_formula()}, / 3), val {args.val_tokens:,} tokens, {args.devices} x H100 "
          f"({PEAK_FLOPS['H100'] / 1e12:.0f} TFLOP/s bf16 dense); budget {budget:.0f}s; preset elbo_steps "
          f"{cfg.elbo_steps}")
    print("| eval MFU | s per ELBO step (whole split) | steps within budget | s at the preset's steps |")
    print("|---:|---:|---:|---:|")
    for mfu in (float(m) for m in args.mfu.split(",")):
        per_step = forward * args.val_tokens / (mfu * PEAK_FLOPS["H100"] * args.devices)
        print(f"| {mfu:.0%} | {per_step:.2f} | {int(budget / per_step)} | {per_step * cfg.elbo_steps:.0f} |")


if __name__ == "__main__":
    main()
