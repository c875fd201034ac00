"""What sub-tokens cost per training step: loss + backward at one shape for l digits and each input merge,
against the token-level model (l = 1) on the same rows and noise.

    OMP_NUM_THREADS=1 python bench/subtokens.py [--preset demo] [--digits 1,2,5,10] [--merges sum,token,concat]
        [--steps 6] [--json OUT]

The package's own objective (objective_for: digit masking) and LossModule (the digit marginals), random
rows that start with BOS, the median of --steps timed steps after one untimed one, on one process.
Prints one JSON line per (l, merge), then a table with the machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from mdlm_golf.config import BOS_ID, build_config
from mdlm_golf.diffusion import draw_noise
from mdlm_golf.model import Transformer
from mdlm_golf.objective import LossModule, objective_for

from machine import cpu_model  # bench/machine.py; the script's folder is on sys.path


def step_ms(digits: int, merge: str, args: argparse.Namespace) -> float:
    """Median milliseconds of one loss + backward on a fixed batch."""
    cfg = dataclasses.replace(build_config(args.preset, environ={}), subtokens=digits, subtoken_merge=merge)
    torch.manual_seed(0)
    model, prepare = Transformer(cfg), objective_for(cfg)
    loss_module = LossModule(model)
    x0 = torch.randint(4, cfg.vocab_size, (cfg.batch_rows, cfg.seq_len), generator=torch.Generator().manual_seed(1))
    x0[:, ::97] = BOS_ID
    times = []
    for i in range(args.steps + 1):
        noise = draw_noise(cfg.batch_rows, cfg.seq_len, torch.Generator().manual_seed(i), digits=digits)
        began = time.perf_counter()
        loss_module(*prepare(x0, noise, i).loss_args()).backward()
        if i:  # the first warms allocators
            times.append(time.perf_counter() - began)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--digits", default="1,2,5,10")
    parser.add_argument("--merges", default="sum,token,concat")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for digits in (int(d) for d in args.digits.split(",")):
        for merge in (["sum"] if digits == 1 else args.merges.split(",")):
            rows.append({"digits": digits, "merge": merge, "step_ms": step_ms(digits, merge, args)})
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    base = next(r["step_ms"] for r in rows if r["digits"] == 1) if any(r["digits"] == 1 for r in rows) else None
    print(f"machine: {cpu_model()}, torch {torch.__version__}, threads {torch.get_num_threads()}; preset {args.preset}")
    print("| digits l | merge | ms per step (loss + backward) | vs l = 1 |")
    print("|---:|---|---:|---:|")
    for r in rows:
        ratio = f"{r['step_ms'] / base:.2f}x" if base else "-"
        print(f"| {r['digits']} | {r['merge'] if r['digits'] > 1 else '-'} | {r['step_ms']:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
