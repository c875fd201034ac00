"""Run logging: the run's header, the step line (loss, lr, dt, tok/s, MFU, peak memory), metrics.jsonl,
the FLOP count behind the MFU, and a progress bar on a terminal."""
from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
from contextlib import suppress
from pathlib import Path
from typing import Callable, TextIO

import numpy as np
import torch

from ..config import Config
from ..files import write_text_atomic
from ..model import Transformer

try:
    import resource  # the process's peak RSS, the CPU's memory figure; POSIX only
except ImportError:  # Windows: no memory figure on the CPU
    resource = None

# dense bf16 tensor-core peak FLOP/s by card name (SXM parts; H200 is the same GH100 chip as H100),
# for the MFU of the log line; an unlisted card logs no MFU
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def git_revision() -> str:
    """The package checkout's short commit hash, or 'unknown' outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def metric_step(line: str) -> float:
    """The step of a metrics.jsonl record; unreadable records sort after every step."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


class RunLog:
    """Log lines to stdout and RUN/train.log, metrics to RUN/metrics.jsonl, a bar on a terminal.

    Only rank 0 logs: on other ranks (enabled=False) every method does nothing.
    """

    def __init__(self, run_dir: Path, total_steps: int, echo: Callable[[str], None] = print,
                 enabled: bool = True):
        self.enabled, self.echo, self.bar = enabled, echo, None
        self.metrics_path = run_dir / "metrics.jsonl"
        if not enabled:
            return
        self.text = open(run_dir / "train.log", "a", encoding="utf-8")
        self.metrics = open(self.metrics_path, "a", encoding="utf-8")
        if sys.stderr.isatty():
            # imported here: the standalone record script (torch, numpy, sentencepiece) never draws a bar
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, desc="train", leave=False, dynamic_ncols=True, file=sys.stderr)

    def line(self, message: str) -> None:
        """One line to the screen (above the bar) and to train.log."""
        if self.enabled:
            (self.bar.write if self.bar and self.echo is print else self.echo)(message)
            append(self.text, message + "\n")

    def record(self, **metrics) -> None:
        """One record to metrics.jsonl."""
        if self.enabled:
            append(self.metrics, json.dumps(metrics) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """On resume: drop records past the checkpoint (a killed run may have logged beyond it)."""
        self.metrics.close()
        kept = [line for line in self.metrics_path.read_text().splitlines(keepends=True)
                if line.endswith("\n") and metric_step(line) <= step]  # a torn last line is dropped
        write_text_atomic(self.metrics_path, "".join(kept))
        self.metrics = open(self.metrics_path, "a", encoding="utf-8")

    def step(self, done: int, cfg: Config, loss: float, lr: float, speed: dict, elapsed: float,
             data_wait: float) -> None:
        """A step's log line and its metrics record."""
        self.line(step_line(done, cfg, loss, lr, speed))
        self.record(step=done, loss=loss, lr=lr, **speed, elapsed_s=elapsed, data_wait_s=data_wait)

    def data_wait(self, event: dict) -> None:
        """The loader's note that training waited for a group of shards to load."""
        self.line(f"data: epoch {event['epoch']} group {event['group']} ({', '.join(event['shards'])}): "
                  f"waited {event['wait_s']:.3f}s for a {event['load_s']:.2f}s load")

    def advance(self) -> None:
        if self.bar:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        if self.enabled and not self.text.closed:
            with suppress(OSError):  # every write was flushed: a full disk was reported by that write
                self.text.close()
            with suppress(OSError):
                self.metrics.close()


def append(log: TextIO, text: str) -> None:
    """Write and flush a log line; a failing write (a full disk) names the log file."""
    try:
        log.write(text)
        log.flush()
    except OSError as e:
        raise OSError(e.errno, e.strerror, log.name) from None


def peak_flops(device: torch.device) -> float | None:
    """The card's dense bf16 peak FLOP/s from PEAK_FLOPS; None on a CPU or an unlisted card."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak memory so far: allocated on the GPU, or the process's peak RSS (None where unknown)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if resource is None:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


class StepMeter:
    """What a step line reports since the line before: the mean loss (summed on the device, read only at
    a vote), dt, tok/s, MFU and peak memory; and the first step whose loss was not finite."""

    def __init__(self, cfg: Config, model: Transformer, device: torch.device, world_size: int, step: int,
                 seconds: float):
        self.device, self.tokens_per_step = device, cfg.tokens_per_step * world_size
        self.flops_per_token, peak = model.flops_per_token(), peak_flops(device)
        self.peak = peak * world_size if peak else None
        self.last_step, self.last_seconds = step, seconds  # the previous line's
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.first_bad_step = torch.zeros((), device=device, dtype=torch.long)
        self.losses: list[float] = []  # every line's mean loss

    def add(self, step: int, step_loss: torch.Tensor) -> None:
        """Count 0-based `step`'s loss, on the device: no host sync."""
        self.loss_sum += step_loss
        self.first_bad_step = torch.where((self.first_bad_step == 0) & ~torch.isfinite(step_loss),
                                          step + 1, self.first_bad_step)

    def mean_loss(self, loss_total: float, done: int) -> float:
        """The mean step loss since the previous line, from the ranks' summed loss_sum."""
        return loss_total / (done - self.last_step)

    def measure(self, done: int, seconds: float, loss_total: float) -> tuple[float, dict]:
        """The mean loss and speed over the training seconds since the previous line; starts the next."""
        loss = self.mean_loss(loss_total, done)
        step_seconds = max(seconds - self.last_seconds, 1e-9) / (done - self.last_step)
        tokens_per_s = self.tokens_per_step / step_seconds
        self.last_step, self.last_seconds = done, seconds
        self.losses.append(loss)
        self.loss_sum.zero_()
        return loss, {"flops": self.flops_per_token * self.tokens_per_step * done,  # cumulative, training
                      "dt_ms": 1e3 * step_seconds, "tokens_per_s": tokens_per_s,
                      "mfu": self.flops_per_token * tokens_per_s / self.peak if self.peak else None,
                      "peak_mem_bytes": peak_memory_bytes(self.device)}

    def non_finite(self, loss_total: float, done: int) -> FloatingPointError:
        """The error for a non-finite loss, naming the first step this rank saw it (or that another did)."""
        bad = int(self.first_bad_step.item())
        where = f"at step {bad}" if bad else f"on another rank by step {done}"
        return FloatingPointError(f"loss became {self.mean_loss(loss_total, done)} {where}; "
                                  f"stopped without writing a checkpoint or model")


def format_bytes(n: int | None) -> str:
    """A memory figure for the log line: MiB, or GiB from 1 GiB on; '-' where unknown."""
    if n is None:
        return "-"
    return f"{n / 2**30:.1f}GiB" if n >= 2**30 else f"{n / 2**20:.0f}MiB"


def step_line(done: int, cfg: Config, loss: float, lr: float, speed: dict) -> str:
    """`step i/N | loss | lr | dt ms | tok/s | mfu | mem`; mfu '-' where the peak is unknown (CPU)."""
    mfu = f"{100 * speed['mfu']:.1f}%" if speed["mfu"] is not None else "-"
    return (f"step {done}/{cfg.steps} | loss {loss:.4f} | lr {lr:.2e} | dt {speed['dt_ms']:.1f}ms | "
            f"tok/s {speed['tokens_per_s']:,.0f} | mfu {mfu} | mem {format_bytes(speed['peak_mem_bytes'])}")


def describe_run(cfg: Config, model: Transformer, device: torch.device, tokens: int, world_size: int) -> list[str]:
    """The run log's header: code and library versions, the device, the model, the data, the config."""
    return [
        f"mdlm-golf {git_revision()} | python {platform.python_version()} | torch {torch.__version__} "
        f"| numpy {np.__version__} | device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        f"model: {model.num_params():,} parameters ({cfg.num_layers} layers, width {cfg.model_dim}, "
        f"{cfg.num_heads} heads, MLP x{cfg.mlp_mult}, seq {cfg.seq_len}); "
        f"{model.flops_per_token():,} training FLOP/token ({model.flop_formula()})",
        f"data: {tokens:,} training tokens, layout {cfg.layout}; "
        f"{cfg.tokens_per_step * world_size:,} tokens/step ({cfg.batch_rows} rows x {cfg.grad_accum} "
        f"accumulation x {world_size} processes x {cfg.seq_len})",
        "config: " + json.dumps(cfg.to_dict()),
    ]

