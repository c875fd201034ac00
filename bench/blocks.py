"""Block diffusion's cost: training tokens/s (the [x_t ; x_0] forward is 2L positions; the encoder-decoder
runs its encoder over x_0 and K decoder layers over x_t), training FLOPs per token (the model's formula),
ELBO scoring slices/s, and sampling tokens/s with and without the KV cache, for each kind at one shape.

    python bench/blocks.py                      # the demo shape on the CPU, B in {seq_len, 64, 16, 4}
        [--preset demo] [--blocks 0,64,16,4] [--steps 6] [--eval-slices 8] [--eval-steps 8]
        [--samples 4] [--sample-len 128] [--sample-steps 8] [--device cpu|cuda] [--json OUT]

A kind in --blocks is B (block size; 0 = the plain MDLM), B:K (an encoder-decoder with K decoder layers
of its own) or B:Kt (K decoder layers tied to the top encoder layers): --blocks 0,2,2:1,2:2,4:1,2:1t.

Training times the package's own LossModule (loss + backward) on random rows that start with BOS, one
process, float32 on the CPU (bf16 autocast on CUDA), median of --steps after one untimed step; the
weights are random (costs do not depend on them). Block 0 is the plain MDLM (one block per row).
Prints one JSON line per block size, then a table with the machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from mdlm_golf.config import BOS_ID, Config, build_config
from mdlm_golf.dist import autocast, pick_device
from mdlm_golf.eval.elbo import elbo_bits
from mdlm_golf.eval.harness import EvalSlices
from mdlm_golf.model import Transformer
from mdlm_golf.diffusion import Noise
from mdlm_golf.objective import LossModule, objective_for
from mdlm_golf.sampling import generate

from machine import cpu_model  # bench/machine.py; the script's folder is on sys.path


def random_rows(cfg: Config, rows: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(4, cfg.vocab_size, (rows, cfg.seq_len), generator=gen)
    x[:, 0] = BOS_ID
    return x


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_tokens_per_s(model: Transformer, cfg: Config, steps: int, device: torch.device) -> float:
    """Tokens of x_0 per second through loss + backward (the median step)."""
    loss_module, prepare = LossModule(model), objective_for(cfg)
    x0 = random_rows(cfg, cfg.batch_rows, 0).to(device)
    gen = torch.Generator().manual_seed(1)
    times = []
    for i in range(steps + 1):
        noise = Noise(*(n.to(device) for n in (torch.rand(cfg.batch_rows, generator=gen),
                                                 torch.rand(x0.shape, generator=gen),
                                                 torch.rand(x0.shape, generator=gen))))
        began = time.perf_counter()
        with autocast(device):
            loss = loss_module(*prepare(x0, noise).loss_args())
        loss.backward()
        sync(device)
        if i:  # the first step warms allocators and caches
            times.append(time.perf_counter() - began)
    return x0.numel() / statistics.median(times)


def eval_slices_per_s(model: Transformer, cfg: Config, slices: int, steps: int, device: torch.device) -> float:
    tokens = random_rows(cfg, slices, 2).numpy()
    evals = EvalSlices(tokens, np.ones_like(tokens), np.arange(slices))
    began = time.perf_counter()
    elbo_bits(model, evals, "strict", steps, cfg.noise_eps, cfg.vocab_size, 0, cfg.eval_batch_rows, device)
    sync(device)
    return slices / (time.perf_counter() - began)


def sample_tokens_per_s(model: Transformer, cfg: Config, args: argparse.Namespace, kv_cache: bool) -> float:
    result = generate(model, cfg, num=args.samples, length=args.sample_len, steps=args.sample_steps, seed=0,
                      device=args.device, kv_cache=kv_cache)
    return result.generated_tokens / result.elapsed


def parse_kind(text: str) -> dict:
    """'B', 'B:K' or 'B:Kt' -> the config fields of that kind."""
    block, _, decoder = text.partition(":")
    return {"block_size": int(block), "decoder_layers": int(decoder.rstrip("t") or 0),
            "decoder_tied": decoder.endswith("t")}


def measure(kind: str, args: argparse.Namespace) -> dict:
    base = build_config(args.preset, environ={})
    cfg = dataclasses.replace(base, **parse_kind(kind))
    torch.manual_seed(0)
    model = Transformer(cfg).to(args.device)
    row = {"kind": kind, "block": cfg.block_size or cfg.seq_len, "blockwise": bool(cfg.block_size),
           "seq_len": cfg.seq_len, "params": model.num_params(), "flops_per_token": model.flops_per_token(),
           "train_tokens_per_s": train_tokens_per_s(model, cfg, args.steps, args.device)}
    model.eval()
    with torch.no_grad():
        row["eval_slices_per_s"] = eval_slices_per_s(model, cfg, args.eval_slices, args.eval_steps, args.device)
    row["sample_tokens_per_s"] = sample_tokens_per_s(model, cfg, args, kv_cache=True)
    if cfg.block_size:
        row["sample_tokens_per_s_uncached"] = sample_tokens_per_s(model, cfg, args, kv_cache=False)
    return row


def table(rows: list[dict], args: argparse.Namespace) -> str:
    plain = next((r for r in rows if not r["blockwise"]), rows[0])
    lines = [f"machine: {cpu_model() if args.device.type == 'cpu' else torch.cuda.get_device_name()}, "
             f"torch {torch.__version__}, threads {torch.get_num_threads()}; preset {args.preset}",
             "| kind | params | train FLOP/token (vs plain) | train tok/s | time/token vs plain | eval slices/s | "
             "sample tok/s (KV cache) | sample tok/s (no cache) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        uncached = f"{r['sample_tokens_per_s_uncached']:,.0f}" if "sample_tokens_per_s_uncached" in r else "-"
        lines.append(f"| {r['kind']} | {r['params']:,} | {r['flops_per_token']:,} "
                     f"({r['flops_per_token'] / plain['flops_per_token']:.2f}x) | {r['train_tokens_per_s']:,.0f} | "
                     f"{plain['train_tokens_per_s'] / r['train_tokens_per_s']:.2f}x | {r['eval_slices_per_s']:.2f} | "
                     f"{r['sample_tokens_per_s']:,.0f} | {uncached} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--blocks", default="0,64,16,4",
                        help="kinds: B (0 = the plain MDLM), B:K (K decoder layers), B:Kt (tied)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--eval-slices", type=int, default=8)
    parser.add_argument("--eval-steps", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--sample-len", type=int, default=128)
    parser.add_argument("--sample-steps", type=int, default=8)
    parser.add_argument("--device", type=torch.device, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.device = args.device or pick_device()
    rows = []
    for kind in args.blocks.split(","):
        rows.append(measure(kind.strip(), args))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows, args))


if __name__ == "__main__":
    main()
