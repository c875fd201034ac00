"""Training and evaluation speed: tokens/s, MFU, peak memory, ELBO token-forwards/s.

    python bench/speed.py                       # reference configuration (CUDA; compiled)
    python bench/speed.py --tiny                # the 'demo' preset, sized for a CPU
        [--steps N] [--warmup W] [--batch-rows R] [--grad-accum A] [--seq-len L]
        [--layout docs|packed|stream] [--data DIR] [--compile | --no-compile]
        [--eval-steps T] [--eval-slices S] [--eval-batch-rows E] [--peak-tflops P]
        [--measure-peak] [--val-tokens V] [--eval-gpus G] [--json OUT] [--device cuda|cpu]

Training runs the package's own step: Transformer, build_optimizer, build_loss_module (torch.compile and
FlexAttention document masks on CUDA when compiled), warm_up outside the clock, then train_step
on one process. Rows come from DIR's train shards through ShardedLoader (--data), or from random
documents with lognormal lengths (mean --doc-mean tokens), each starting with BOS, cut into rows
the way the loader cuts them: docs = one PAD-filled document window per row; packed/stream =
contiguous windows of the document stream.

On CUDA every step is timed with CUDA events (no host sync inside the timed loop beyond what
train_step itself does) and the whole loop with the wall clock after a synchronize; on the CPU
with the wall clock per step. Reported: median step time, tokens/s = rows x accumulation x
seq_len / median step, useful tokens/s (non-PAD tokens), MFU from
FLOPs/token = 6 N_matmul + 12 n_layers d_model seq_len (printed with its numbers), and peak
memory (torch.cuda.max_memory_allocated, or peak RSS on the CPU).

Evaluation times elbo_bits (the compiled model when compiling) on S slices x T steps after an
identical untimed call, and projects the whole validation split at T steps on --eval-gpus devices.

Configuration comes from flags only (the reference defaults or a preset): environment variables
such as NUM_LAYERS are ignored so a printed figure always matches its command line.
Prints one JSON line, then a table; --json also writes the JSON (after training, then again
after evaluation, so a run cut short still leaves its training figures).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from mdlm_golf.config import BOS_ID, LAYOUTS, Config, build_config
from mdlm_golf.data import read_shard, shard_paths
from mdlm_golf.data.rows import copy_rows, doc_windows
from mdlm_golf.dist import init_distributed, pick_device
from mdlm_golf.eval.elbo import elbo_bits
from mdlm_golf.eval.harness import EvalSlices
from mdlm_golf.data.loader import ShardedLoader
from mdlm_golf.model import Transformer
from mdlm_golf.objective import objective_for
from mdlm_golf.train.loop import build_loss_module, train_step, warm_up
from mdlm_golf.train.optim import build_optimizer, lr_factor
from mdlm_golf.train.runlog import PEAK_FLOPS

from machine import cpu_model  # bench/machine.py; the script's folder is on sys.path

# dense bf16 peaks: the trainer's table (a measured 8192^3 bf16 matmul reaches ~800 TFLOP/s on an
# H100 or H200; --measure-peak times one)
VAL_TOKENS = 62_000_000  # the FineWeb val split, ~62M tokens


# ---------------------------------------------------------------- rows

class RandomDocs:
    """Random documents (BOS + uniform tokens, lognormal lengths) served as rows like ShardedLoader's."""

    def __init__(self, cfg: Config, pool_rows: int, doc_mean: float, seed: int):
        rng = np.random.default_rng(seed)
        self.seq_len, self.pad_id = cfg.seq_len, cfg.tokens.pad
        lengths = np.zeros(0, np.int64)
        while lengths.sum() < max(pool_rows, 1) * cfg.seq_len:
            draw = rng.lognormal(math.log(doc_mean) - 0.5, 1.0, 1024)  # sigma 1: mean exp(mu + 1/2)
            lengths = np.concatenate([lengths, np.maximum(2, draw).astype(np.int64)])
        self.tokens = rng.integers(2, cfg.vocab_size, int(lengths.sum()), dtype=np.uint16)
        self.tokens[np.cumsum(lengths) - lengths] = BOS_ID
        if cfg.layout == "docs":
            starts, row_lengths = doc_windows(self.tokens, cfg.seq_len)
        else:
            starts = np.arange(self.tokens.size // cfg.seq_len) * cfg.seq_len
            row_lengths = np.full(starts.size, cfg.seq_len)
        order = rng.permutation(starts.size)
        self.starts, self.lengths = starts[order], row_lengths[order]
        self.cursor = 0
        self.mean_doc_len = float(lengths.mean())

    def next_rows(self, rows: int) -> np.ndarray:
        pick = np.arange(self.cursor, self.cursor + rows) % self.starts.size
        self.cursor += rows
        return copy_rows(self.tokens, self.starts[pick], self.lengths[pick], self.seq_len, self.pad_id)


class CountingRows:
    """Wraps a row source; counts the rows and non-PAD tokens it hands out (while counting)."""

    def __init__(self, source, pad_id: int):
        self.source, self.pad_id = source, pad_id
        self.counting, self.tokens, self.useful = False, 0, 0

    def next_rows(self, rows: int) -> np.ndarray:
        out = self.source.next_rows(rows)
        if self.counting:
            self.tokens += out.size
            self.useful += int(np.count_nonzero(out != self.pad_id))
        return out


def eval_slices(cfg: Config, count: int, data: Path | None, doc_mean: float) -> EvalSlices:
    """The first `count` seq_len windows of the val split (--data), or of random documents."""
    need = count * cfg.seq_len
    if data is not None:
        stream = read_shard(shard_paths(data, "val")[0], cfg.vocab_size)
    else:
        stream = RandomDocs(dataclasses.replace(cfg, layout="stream"), count, doc_mean, seed=1).tokens
    if stream.size < need:
        raise SystemExit(f"val data holds {stream.size:,} tokens, fewer than {count} slices of {cfg.seq_len}")
    tokens = stream[:need].astype(np.int64).reshape(count, cfg.seq_len)
    return EvalSlices(tokens, np.zeros_like(tokens), np.arange(count))


# ---------------------------------------------------------------- FLOPs, peaks, memory

def flops_per_token(model: Transformer, cfg: Config) -> tuple[int, str]:
    """Training FLOPs per token (forward + backward), as the trainer's MFU counts them, with the formula
    (the plain model's, written out)."""
    n = model.matmul_params()
    attention = 12 * cfg.num_layers * cfg.model_dim * cfg.seq_len
    total = model.flops_per_token()  # the trainer's own formula
    formula = (f"6*N_matmul + 12*n_layers*d_model*seq_len = 6*{n:,} + 12*{cfg.num_layers}*{cfg.model_dim}"
               f"*{cfg.seq_len} = {6 * n:,} + {attention:,} = {total:,} FLOP/token")
    return total, formula


def peak_flops(device: torch.device, tflops: float | None) -> tuple[float | None, str]:
    """Peak FLOP/s for MFU and where it came from; None (MFU n/a) on a CPU without --peak-tflops."""
    if tflops is not None:
        return tflops * 1e12, f"--peak-tflops {tflops:g}"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_FLOPS.items():
            if key in name:
                return value, f"{value / 1e12:g} TFLOP/s, {key} dense bf16 spec"
        return None, f"unknown card {name!r}: pass --peak-tflops"
    return None, "n/a on CPU (pass --peak-tflops)"


def measure_matmul_flops(device: torch.device) -> float:
    """FLOP/s of a large square matmul (bf16 8192^3 on CUDA, fp32 1024^3 on the CPU)."""
    n, dtype, reps = (8192, torch.bfloat16, 10) if device.type == "cuda" else (1024, torch.float32, 5)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    began = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - began)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS of the process (ru_maxrss)"


def dynamo_stats() -> dict:
    """Graph breaks and compiled graphs so far (torch._dynamo's counters)."""
    from torch._dynamo.utils import counters

    breaks = dict(counters["graph_break"])
    return {"dynamo_unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
            "dynamo_graph_breaks": int(sum(breaks.values())),
            "dynamo_graph_break_reasons": {k[:200]: v for k, v in list(breaks.items())[:10]}}


# ---------------------------------------------------------------- measurements

def time_training(cfg: Config, args, source: CountingRows) -> tuple[dict, Transformer]:
    """Warm up (compile) off the clock, then time args.steps optimizer steps of train_step."""
    env = init_distributed(args.device)
    if env.distributed:
        raise SystemExit("bench/speed.py measures one process; run it without torchrun")
    device = env.device
    torch.manual_seed(cfg.seed)
    model = Transformer(cfg).to(device)
    optimizer = build_optimizer(model, cfg, device)
    loss_module, prepare = build_loss_module(model, cfg, env), objective_for(cfg)
    compile_s = warm_up(loss_module, prepare, model, cfg, env) if cfg.compile else 0.0

    def step(i: int) -> torch.Tensor:
        optimizer.set_lr_factor(lr_factor(i, cfg))
        return train_step(loss_module, prepare, model, optimizer, source, cfg, i, env)

    began = time.perf_counter()
    for i in range(args.warmup):
        step(i)
    sync(device)
    warmup_s = time.perf_counter() - began
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    source.counting = True
    loss = torch.zeros((), device=device, dtype=torch.float64)
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(args.steps + 1)] if device.type == "cuda" else []
    step_s = []
    wall = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        if marks:
            marks[i - args.warmup].record()
        else:
            step_began = time.perf_counter()
        loss += step(i)
        if not marks:
            step_s.append(time.perf_counter() - step_began)
    if marks:
        marks[-1].record()
    sync(device)
    wall = time.perf_counter() - wall
    source.counting = False
    if marks:
        step_s = [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]
    memory, memory_kind = peak_memory(device)
    reserved = {"train_peak_reserved_bytes": torch.cuda.max_memory_reserved(device)} if marks else {}
    median = statistics.median(step_s)
    tokens = cfg.tokens_per_step
    return {
        "compile_s": compile_s, "warmup_steps_s": warmup_s,
        "step_ms_median": median * 1e3, "step_ms_min": min(step_s) * 1e3, "step_ms_max": max(step_s) * 1e3,
        "tokens_per_s": tokens / median, "tokens_per_s_wall": tokens * args.steps / wall,
        "useful_fraction": source.useful / max(1, source.tokens),
        "useful_tokens_per_s": tokens / median * source.useful / max(1, source.tokens),
        "train_peak_memory_bytes": memory, "peak_memory_kind": memory_kind,
        "final_loss": loss.item() / args.steps, **reserved,
    }, model


def time_eval(model: Transformer, cfg: Config, args, device: torch.device) -> dict:
    """token-forwards/s of elbo_bits on S slices x T steps, after an identical untimed call."""
    slices = eval_slices(cfg, args.eval_slices, args.data, args.doc_mean)
    forward = torch.compile(model) if cfg.compile else model
    was_training = model.training
    model.eval()

    def run() -> None:
        elbo_bits(forward, slices, "strict", args.eval_steps, cfg.noise_eps, cfg.vocab_size, cfg.seed,
                  args.eval_batch_rows, device)

    began = time.perf_counter()
    run()  # compiles (both batch shapes, when S x T is not a multiple of the batch)
    sync(device)
    warm_s = time.perf_counter() - began
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    began = time.perf_counter()
    run()
    sync(device)
    seconds = time.perf_counter() - began
    model.train(was_training)
    rate = args.eval_slices * args.eval_steps * cfg.seq_len / seconds
    out = {"eval_slices": args.eval_slices, "eval_steps": args.eval_steps,
           "eval_batch_rows": args.eval_batch_rows, "eval_warmup_s": warm_s, "eval_seconds": seconds,
           "eval_token_forwards_per_s": rate, "val_tokens": args.val_tokens, "eval_gpus": args.eval_gpus,
           "val_projection_s": args.val_tokens * args.eval_steps / (rate * args.eval_gpus),
           "val_projection_formula": f"val_tokens*T/(rate*gpus) = {args.val_tokens:,}*{args.eval_steps}"
                                     f"/({rate:,.0f}*{args.eval_gpus})"}
    if device.type == "cuda":
        out["eval_peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


# ---------------------------------------------------------------- report

def describe(device: torch.device, cfg: Config, model: Transformer, args, source_name: str) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return {
        "device": str(device), "device_name": name, "torch": torch.__version__,
        "python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
        "config": (f"{cfg.num_layers} layers, width {cfg.model_dim}, {cfg.num_heads} heads, "
                   f"MLP x{cfg.mlp_mult}, seq {cfg.seq_len}, {cfg.batch_rows} rows x {cfg.grad_accum} accum, "
                   f"layout {cfg.layout}, compile {cfg.compile}"),
        "preset": args.preset or "reference", "layout": cfg.layout, "compile": cfg.compile,
        "seq_len": cfg.seq_len, "batch_rows": cfg.batch_rows, "grad_accum": cfg.grad_accum,
        "tokens_per_step": cfg.tokens_per_step, "num_params": model.num_params(),
        "data": source_name, "steps": args.steps, "warmup": args.warmup,
    }




def table(r: dict) -> str:
    mfu = f"{100 * r['mfu']:.1f}% of {r['peak_flops'] / 1e12:g} TFLOP/s" if r.get("mfu") is not None else "n/a"
    rows = [
        ("device", f"{r['device_name']} | torch {r['torch']}"),
        ("config", r["config"]),
        ("data", r["data"]),
        ("step time (median)", f"{r['step_ms_median']:.1f} ms over {r['steps']} steps "
                               f"(min {r['step_ms_min']:.1f}, max {r['step_ms_max']:.1f})"),
        ("tokens/s", f"{r['tokens_per_s']:,.0f} (wall-clock mean {r['tokens_per_s_wall']:,.0f})"),
        ("useful tokens/s", f"{r['useful_tokens_per_s']:,.0f} (non-PAD {100 * r['useful_fraction']:.1f}%)"),
        ("FLOPs/token", r["flop_formula"]),
        ("MFU", mfu + f" [{r['peak_flops_source']}]"),
        ("peak memory", f"{r['train_peak_memory_bytes'] / 2**30:.2f} GiB ({r['peak_memory_kind']})"),
    ]
    if r.get("mfu_vs_measured") is not None:
        rows.append(("MFU vs measured matmul", f"{100 * r['mfu_vs_measured']:.1f}% of "
                                               f"{r['matmul_flops_measured'] / 1e12:.3g} TFLOP/s"))
    if r.get("compile"):
        rows.append(("compile (warm-up)", f"{r['compile_s']:.1f} s train, "
                                          f"{r.get('eval_warmup_s', float('nan')):.1f} s eval (incl. one eval pass); "
                                          f"{r['dynamo_graph_breaks']} graph breaks"))
    if "eval_token_forwards_per_s" in r:
        rows += [("eval token-forwards/s", f"{r['eval_token_forwards_per_s']:,.0f} ({r['eval_slices']} slices x "
                                           f"{r['eval_steps']} steps, {r['eval_batch_rows']} rows/forward)"),
                 (f"val projection ({r['eval_gpus']} x this device)",
                  f"{r['val_projection_s']:,.0f} s for {r['val_tokens']:,} tokens at T={r['eval_steps']}")]
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"{'metric'.ljust(width)} | value", f"{'-' * width}-|------"]
                     + [f"{k.ljust(width)} | {v}" for k, v in rows])


def write_json(path: Path | None, result: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")


# ---------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="the 'demo' preset (a CPU-sized model)")
    p.add_argument("--preset", default=None, help="a config preset (default: the reference configuration)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on CUDA, 5 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3 on CUDA, 1 on CPU)")
    p.add_argument("--batch-rows", type=int, default=None)
    p.add_argument("--grad-accum", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--layout", choices=LAYOUTS, default="packed")
    p.add_argument("--data", type=Path, default=None, help="folder of fineweb_{train,val}_*.bin shards")
    p.add_argument("--doc-mean", type=float, default=600.0, help="mean random document length (tokens)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile (default: on CUDA yes, on CPU no)")
    p.add_argument("--eval-steps", type=int, default=128)
    p.add_argument("--eval-slices", type=int, default=None, help="default 8 on CUDA, 2 on CPU")
    p.add_argument("--eval-batch-rows", type=int, default=None, help="default: the config's eval_batch_rows")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--val-tokens", type=int, default=VAL_TOKENS)
    p.add_argument("--eval-gpus", type=int, default=8)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak for MFU (default: 989 on H100/H200; n/a on CPU)")
    p.add_argument("--measure-peak", action="store_true", help="also time a large matmul for an achievable peak")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--device", type=torch.device, default=None)
    args = p.parse_args(argv)
    args.device = args.device or pick_device()
    cuda = args.device.type == "cuda"
    if cuda and args.device.index is None:  # torch.cuda.set_device (in init_distributed) needs an index
        args.device = torch.device("cuda", torch.cuda.current_device())
    args.preset = "demo" if args.tiny else args.preset
    args.steps = args.steps if args.steps is not None else (20 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.compile = cuda if args.compile is None else args.compile
    args.eval_slices = args.eval_slices or (8 if cuda else 2)
    if args.steps < 1 or args.warmup < 0 or args.eval_slices < 1 or args.eval_steps < 1:
        p.error("--steps, --eval-slices and --eval-steps must be >= 1, --warmup >= 0")
    return args


def row_source(cfg: Config, args) -> tuple[ShardedLoader | RandomDocs, str]:
    """DIR's train shards through ShardedLoader (--data), or random documents; and a description."""
    if args.data is not None:
        loader = ShardedLoader(shard_paths(args.data, "train"), cfg.seq_len, cfg.layout, cfg.tokens.pad,
                               cfg.vocab_size, cfg.seed, shards_per_group=cfg.shards_per_group,
                               batch_rows=cfg.batch_rows)
        return loader, f"{args.data} train shards (ShardedLoader)"
    pool = (args.warmup + args.steps + 1) * cfg.batch_rows * cfg.grad_accum
    docs = RandomDocs(cfg, pool, args.doc_mean, cfg.seed)
    return docs, f"random documents, lognormal lengths (mean {docs.mean_doc_len:.0f} tokens), BOS-led"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cfg = build_config(args.preset, environ={}, overrides=dict(
        layout=args.layout, batch_rows=args.batch_rows, grad_accum=args.grad_accum, seq_len=args.seq_len,
        compile=args.compile))
    args.eval_batch_rows = args.eval_batch_rows or cfg.eval_batch_rows
    loader, source_name = row_source(cfg, args)
    source = CountingRows(loader, cfg.tokens.pad)
    train, model = time_training(cfg, args, source)
    device = args.device
    result = describe(device, cfg, model, args, source_name)
    flops, formula = flops_per_token(model, cfg)
    peak, peak_source = peak_flops(device, args.peak_tflops)
    result.update(train, n_matmul_params=model.matmul_params(), flops_per_token=flops, flop_formula=formula,
                  peak_flops=peak, peak_flops_source=peak_source,
                  mfu=train["tokens_per_s"] * flops / peak if peak else None, **dynamo_stats())
    if args.measure_peak:
        measured = measure_matmul_flops(device)
        result.update(matmul_flops_measured=measured, mfu_vs_measured=train["tokens_per_s"] * flops / measured)
    if isinstance(loader, ShardedLoader):
        result["data_wait_s_total"] = loader.stats["wait_s_total"]  # warm-up steps included
        loader.close()
    write_json(args.json, result)
    if not args.no_eval:
        result.update(time_eval(model, cfg, args, device), **dynamo_stats())
        write_json(args.json, result)
    print(json.dumps(result))
    print(table(result))
    return result


if __name__ == "__main__":
    main()
