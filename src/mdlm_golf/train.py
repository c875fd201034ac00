"""The training loop: one train(cfg) whose step reads top to bottom."""
from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .checkpoint import run_checkpoint, save_checkpoint
from .config import Config, write_text_atomic
from .data import ByteTable, load_split, load_tokenizer, shard_paths
from .diffusion import Tokens, diffusion_loss
from .evaluate import evaluate, format_result
from .loader import ShardedLoader
from .model import MDLM


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup, constant, then cosine warmdown to 0.1x over the last warmdown_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    into_warmdown = step - (cfg.steps - cfg.warmdown_steps)
    if cfg.warmdown_steps <= 0 or into_warmdown < 0:
        return cfg.lr
    progress = min(1.0, (into_warmdown + 1) / cfg.warmdown_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def build_optimizer(model: MDLM, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm-free biases and embeddings excluded)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith("embed")]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or n.startswith("embed")]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class RunLog:
    """Log lines to stdout and RUN/train.log, metrics to RUN/metrics.jsonl, a bar on a terminal."""

    def __init__(self, run_dir: Path, total_steps: int, echo: Callable[[str], None] = print):
        self.text = open(run_dir / "train.log", "a", encoding="utf-8")
        self.metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.echo = echo
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, desc="train", leave=False, dynamic_ncols=True)

    def line(self, message: str) -> None:
        (self.bar.write if self.bar else self.echo)(message)
        self.text.write(message + "\n")
        self.text.flush()

    def record(self, **metrics) -> None:
        self.metrics.write(json.dumps(metrics) + "\n")
        self.metrics.flush()

    def advance(self, loss: float | None = None) -> None:
        if self.bar:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}")

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        self.text.close()
        self.metrics.close()


def describe_run(cfg: Config, model: MDLM, device: torch.device, tokens: int) -> list[str]:
    return [
        f"mdlm-golf {git_revision()} | python {platform.python_version()} | torch {torch.__version__} "
        f"| numpy {np.__version__} | device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        f"model: {model.num_params():,} parameters ({cfg.num_layers} layers, width {cfg.model_dim}, "
        f"{cfg.num_heads} heads, MLP x{cfg.mlp_mult}, seq {cfg.seq_len})",
        f"data: {tokens:,} training tokens, layout {cfg.layout}; {cfg.tokens_per_step:,} tokens/step "
        f"({cfg.batch_rows} rows x {cfg.grad_accum} accumulation x {cfg.seq_len})",
        "config: " + json.dumps(cfg.to_dict()),
    ]


def train(cfg: Config, data_dir: Path, out_dir: Path, tokenizer_path: Path, *, run_eval: bool = True,
          device: torch.device | None = None, echo: Callable[[str], None] = print) -> dict:
    """Train an MDLM on DIR's train shards, save RUN/model.pt, evaluate on the val shards."""
    device = device or pick_device()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(out_dir / "config.json")
    byte_table = ByteTable.from_tokenizer(load_tokenizer(tokenizer_path), cfg.vocab_size)
    val_tokens = load_split(data_dir, "val", cfg.vocab_size) if run_eval else None
    loader = ShardedLoader(shard_paths(data_dir, "train"), cfg.seq_len, cfg.layout, cfg.pad_id,
                           cfg.vocab_size, cfg.seed, shards_per_group=cfg.shards_per_group,
                           batches_per_group=cfg.batches_per_group or None, batch_rows=cfg.batch_rows)

    torch.manual_seed(cfg.seed)
    model = MDLM(cfg).to(device)
    optimizer = build_optimizer(model, cfg, device)
    mask_generator = torch.Generator().manual_seed(cfg.seed + 1)
    tokens = Tokens(cfg.vocab_size)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    log = RunLog(out_dir, cfg.steps, echo)
    for line in describe_run(cfg, model, device, loader.total_tokens):
        log.line(line)
    log.line("loader: " + loader.describe())
    loader.on_wait = lambda e: log.line(
        f"data: epoch {e['epoch']} group {e['group']} ({', '.join(e['shards'])}): "
        f"waited {e['wait_s']:.3f}s for a {e['load_s']:.2f}s load")
    began = time.perf_counter()
    last_time, last_step = began, 0
    loss_sum = torch.zeros((), device=device)
    losses: list[float] = []
    stop_reason = f"reached {cfg.steps} steps"
    step = 0
    for step in range(cfg.steps):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for _ in range(cfg.grad_accum):
            x0 = torch.from_numpy(loader.next_rows(cfg.batch_rows)).to(device, non_blocking=True)
            with autocast:
                out = diffusion_loss(model, x0, tokens, cfg.noise_eps, cfg.layout, mask_generator,
                                     cfg.anchor_mask_prob)
            (out.loss / cfg.grad_accum).backward()
            loss_sum += out.loss.detach() / cfg.grad_accum
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        elapsed = time.perf_counter() - began
        if done % cfg.log_every == 0 or done == cfg.steps:
            loss = loss_sum.item() / (done - last_step)  # the only host sync of the step
            if not math.isfinite(loss):
                loader.close()
                log.close()
                raise FloatingPointError(f"loss is {loss} at step {done}; stopping before saving anything")
            now = time.perf_counter()
            tok_s = (done - last_step) * cfg.tokens_per_step / (now - last_time)
            log.line(f"step {done}/{cfg.steps} | loss {loss:.4f} | lr {lr:.2e} | "
                     f"tok/s {tok_s:,.0f} | elapsed {elapsed:.1f}s")
            log.record(step=done, loss=loss, lr=lr, tokens_per_s=tok_s, elapsed_s=elapsed,
                       data_wait_s=loader.stats["wait_s_total"])
            losses.append(loss)
            loss_sum.zero_()
            last_time, last_step = now, done
        log.advance()
        if cfg.max_wallclock and elapsed >= cfg.max_wallclock and done < cfg.steps:
            stop_reason = f"wall-clock cap of {cfg.max_wallclock:g}s reached after {elapsed:.1f}s"
            break
    train_seconds = time.perf_counter() - began
    loader.close()
    steps_done = step + 1
    log.line(f"stopped at step {steps_done}: {stop_reason}; training time {train_seconds:.1f}s")
    save_checkpoint(run_checkpoint(out_dir), model, cfg, step=steps_done,
                    tokenizer=str(Path(tokenizer_path).resolve()))

    summary = {"steps": steps_done, "train_seconds": train_seconds, "stop_reason": stop_reason,
               "num_params": model.num_params(), "losses": losses}
    if run_eval:
        results = evaluate(model, val_tokens, byte_table, cfg, steps=cfg.elbo_steps,
                           num_seqs=cfg.eval_num_seqs, seed=cfg.seed)
        for r in results.values():
            log.line("eval " + format_result(r))
        write_text_atomic(out_dir / "eval.json", json.dumps(results, indent=2) + "\n")
        summary["eval"] = results
    log.close()
    return summary
