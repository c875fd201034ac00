"""The training loop: one train(cfg) whose step reads top to bottom."""
from __future__ import annotations

import enum
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from ..checkpoint import CheckpointError, read_checkpoint, run_checkpoint, save_checkpoint
from ..config import BOS_ID, Config, config_from_dict
from ..files import read_json_object, write_text_atomic
from ..data import ByteTable, load_split, load_tokenizer, shard_paths
from ..diffusion import Noise, draw_noise
from ..dist import DistEnv, all_reduce_sum, barrier, dist_backend_needs_device, init_distributed, to_device
from ..eval import HEADLINE_MODES, evaluate, format_result, headline
from ..data import ShardedLoader
from ..model import MDLM
from ..objective import Objective, scored_count
from .optim import Optimizers, WeightEMA, build_optimizer

CHECKPOINT_NAME = "checkpoint.pt"  # training state for --resume; model.pt holds the final weights
# fields a resumed run may change: how long and how it logs, not what it trains
RESUMABLE_FIELDS = {"steps", "max_wallclock", "log_every", "checkpoint_every", "elbo_steps",
                    "eval_num_seqs", "eval_batch_rows"}
# what a run folder holds: a new run refuses a folder with any of them (the CLI's --overwrite deletes them)
RUN_FILES = ("model.pt", CHECKPOINT_NAME, "config.json", "metrics.jsonl", "train.log", "eval.json")
# the most training seconds between two stop votes (projected): a signal waits at most about this
# long, well inside the ~30 s a scheduler leaves between SIGTERM and SIGKILL
VOTE_SECONDS = 5.0
# dense bf16 tensor-core peak FLOP/s by card name (SXM parts; H200 is the same GH100 chip as H100),
# for the MFU of the log line; an unlisted card logs no MFU
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def progress(step: int, cfg: Config, elapsed: float) -> float:
    """Fraction of the run done after this step: of the steps, or of the wall-clock budget if that
    runs out first, so a capped run always completes its warmdown."""
    done = (step + 1) / cfg.steps
    return max(done, elapsed / cfg.max_wallclock) if cfg.max_wallclock else done


def lr_factor(step: int, cfg: Config, elapsed: float = 0.0) -> float:
    """Linear warmup over warmup_steps, constant, then cosine warmdown to 0.1x over the last
    warmdown_steps / steps of the run's progress (steps, or seconds under --max-wallclock)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    warmdown = min(1.0, cfg.warmdown_steps / cfg.steps)
    into = progress(step, cfg, elapsed) - (1.0 - warmdown)
    if warmdown <= 0 or into < 0:
        return 1.0
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, into / warmdown)))


def git_revision() -> str:
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
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, desc="train", leave=False, dynamic_ncols=True, file=sys.stderr)

    def line(self, message: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar and self.echo is print else self.echo)(message)
            self.text.write(message + "\n")
            self.text.flush()

    def record(self, **metrics) -> None:
        if self.enabled:
            self.metrics.write(json.dumps(metrics) + "\n")
            self.metrics.flush()

    def truncate_metrics(self, step: int) -> None:
        """On resume: drop records past the checkpoint (a killed run may have logged beyond it)."""
        self.metrics.close()
        kept = [line for line in self.metrics_path.read_text().splitlines(keepends=True)
                if line.endswith("\n") and metric_step(line) <= step]  # a torn last line is dropped
        write_text_atomic(self.metrics_path, "".join(kept))
        self.metrics = open(self.metrics_path, "a", encoding="utf-8")

    def advance(self) -> None:
        if self.bar:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        if self.enabled and not self.text.closed:
            self.text.close()
            self.metrics.close()


def matmul_params(model: MDLM) -> int:
    """Weights of the per-token matmuls: the attention and MLP Linears of every block, and the head.
    The embedding is a lookup and the adaLN Linears run once per row, so they are left out."""
    return sum(m.weight.numel() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and (name.startswith("blocks.") and "adaln" not in name or name == "head"))


def flops_per_token(cfg: Config, model: MDLM) -> int:
    """Training FLOPs per token, forward and backward: 6 N_matmul + 12 n_layers d_model seq_len."""
    return 6 * matmul_params(model) + 12 * cfg.num_layers * cfg.model_dim * cfg.seq_len


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
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


class Speed:
    """A log line's dt, tok/s and MFU over the training seconds since the previous line, and peak memory."""

    def __init__(self, cfg: Config, model: MDLM, device: torch.device, world_size: int, step: int,
                 seconds: float):
        self.device, self.tokens_per_step = device, cfg.tokens_per_step * world_size
        self.flops_per_token, peak = flops_per_token(cfg, model), peak_flops(device)
        self.peak = peak * world_size if peak else None
        self.last_step, self.last_seconds = step, seconds

    def measure(self, done: int, seconds: float) -> dict:
        step_seconds = max(seconds - self.last_seconds, 1e-9) / (done - self.last_step)
        tokens_per_s = self.tokens_per_step / step_seconds
        self.last_step, self.last_seconds = done, seconds
        return {"dt_ms": 1e3 * step_seconds, "tokens_per_s": tokens_per_s,
                "mfu": self.flops_per_token * tokens_per_s / self.peak if self.peak else None,
                "peak_mem_bytes": peak_memory_bytes(self.device)}


def format_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.1f}GiB" if n >= 2**30 else f"{n / 2**20:.0f}MiB"


def step_line(done: int, cfg: Config, loss: float, lr: float, speed: dict) -> str:
    """`step i/N | loss | lr | dt ms | tok/s | mfu | mem`; mfu '-' where the peak is unknown (CPU)."""
    mfu = f"{100 * speed['mfu']:.1f}%" if speed["mfu"] is not None else "-"
    return (f"step {done}/{cfg.steps} | loss {loss:.4f} | lr {lr:.2e} | dt {speed['dt_ms']:.1f}ms | "
            f"tok/s {speed['tokens_per_s']:,.0f} | mfu {mfu} | mem {format_bytes(speed['peak_mem_bytes'])}")


def describe_run(cfg: Config, model: MDLM, device: torch.device, tokens: int, world_size: int) -> list[str]:
    return [
        f"mdlm-golf {git_revision()} | python {platform.python_version()} | torch {torch.__version__} "
        f"| numpy {np.__version__} | device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        f"model: {model.num_params():,} parameters ({cfg.num_layers} layers, width {cfg.model_dim}, "
        f"{cfg.num_heads} heads, MLP x{cfg.mlp_mult}, seq {cfg.seq_len}); "
        f"{flops_per_token(cfg, model):,} training FLOP/token (6 N_matmul + 12 n_layers d_model seq_len)",
        f"data: {tokens:,} training tokens, layout {cfg.layout}; "
        f"{cfg.tokens_per_step * world_size:,} tokens/step ({cfg.batch_rows} rows x {cfg.grad_accum} "
        f"accumulation x {world_size} processes x {cfg.seq_len})",
        "config: " + json.dumps(cfg.to_dict()),
    ]


def global_row_ids(micro: int, rows: int, rank: int, world_size: int) -> torch.Tensor:
    """Rows of the step's global batch that (rank, micro-step) holds, as the loader hands them out."""
    return micro * rows * world_size + rank + world_size * torch.arange(rows)


def step_noise(cfg: Config, step: int, world_size: int, device: torch.device) -> Noise:
    """All noise of one optimizer step, drawn for the global batch from a (seed, step) generator on
    the training device: every split of the batch over ranks and micro-steps sees the same draws,
    resuming needs no generator state, and the GPU never waits for a host-to-device copy."""
    generator = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step)
    return draw_noise(cfg.batch_rows * cfg.grad_accum * world_size, cfg.seq_len, generator)


class StopSignal:
    """SIGTERM or a first Ctrl-C (SIGINT) asks for a checkpoint and a clean exit at the step boundary
    of the next stop vote (RunControl: a log step, or within ~VOTE_SECONDS); a second Ctrl-C aborts at
    once. The previous handlers come back on exit."""

    def __init__(self) -> None:
        self.received: str | None = None  # the first signal's name
        self.previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():  # only it may set handlers
            self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt
        self.received = self.received or signal.Signals(signum).name
        if signum == signal.SIGINT:
            try:  # os.write, not print: a handler may interrupt a print to the same stream
                os.write(2, b"\nCtrl-C: stopping within a few steps with a checkpoint "
                            b"(Ctrl-C again aborts without one)\n")
            except OSError:
                pass

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            if handler is not None:  # None: set outside Python, cannot be restored from here
                signal.signal(signum, handler)


class Stop(enum.Enum):
    """Why training stopped: a signal leaves a checkpoint for --resume, the others finish the run."""
    STEPS = "steps"
    SIGTERM = "SIGTERM"
    SIGINT = "SIGINT"
    WALLCLOCK = "wall-clock cap"

    @property
    def resumable(self) -> bool:
        return self in (Stop.SIGTERM, Stop.SIGINT)

    def describe(self, cfg: Config, seconds: float) -> str:
        return {Stop.STEPS: f"reached {cfg.steps} steps", Stop.SIGTERM: "SIGTERM received",
                Stop.SIGINT: "SIGINT (Ctrl-C) received",
                Stop.WALLCLOCK: f"wall-clock cap of {cfg.max_wallclock:g}s reached after {seconds:.1f}s "
                                f"of training"}[self]


class TrainClock:
    """Training seconds. A read waits for the device first (so it is a host sync: votes only);
    evaluation and checkpoints are taken off the clock."""

    def __init__(self, device: torch.device, seconds: float = 0.0):
        self.device, self.start = device, time.perf_counter() - seconds

    def read(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - self.start

    @contextmanager
    def paused(self) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - began


@dataclass(frozen=True)
class Vote:
    """What every rank agreed at a vote: steps done, training seconds (the ranks' mean), and the seconds
    per step since the vote before (None before the first vote)."""
    step: int
    seconds: float
    step_seconds: float | None = None


class RunControl:
    """When to stop, and the training time that keys the lr under --max-wallclock, the same on every
    rank without a host sync per step.

    A vote is one all-reduce read on the host: any rank's SIGTERM or Ctrl-C, any rank past the cap, the
    ranks' mean clock. The loop votes at its log and validation steps; on top of those this plans votes
    from agreed numbers only (so every rank votes at the same steps): at least every VOTE_SECONDS, which
    bounds how late a signal is noticed, and under --max-wallclock half way to the projected cap each
    time, so the last votes fall on every step and a capped run stops at the first step boundary past
    the cap, give or take a step if the step time jumps. Between votes every rank takes its training time
    as the last agreed time + steps since x agreed seconds per step, so all ranks set the same lr.
    """

    def __init__(self, cfg: Config, step: int, seconds: float, stop_signal: StopSignal):
        self.cfg, self.stop_signal = cfg, stop_signal
        self.last = Vote(step, seconds)
        self.next = self._plan()

    def seconds_at(self, step: int) -> float:
        """Training seconds before 0-based `step`: the last vote's, projected forward."""
        return self.last.seconds + (step - self.last.step) * (self.last.step_seconds or 0.0)

    def due(self, done: int) -> bool:
        return done >= self.next

    def vote(self, done: int, seconds: float, rider: torch.Tensor) -> tuple[float, Stop | None]:
        """Vote after `done` steps, this rank at `seconds`; `rider` (a scalar: the loss sum) is summed over
        the ranks in the same all-reduce. Returns its sum and why to stop (None: go on)."""
        cfg, received = self.cfg, self.stop_signal.received
        capped = bool(cfg.max_wallclock) and seconds >= cfg.max_wallclock
        ballot = torch.tensor([0.0, received == "SIGTERM", received == "SIGINT", capped, seconds, 1.0],
                              dtype=torch.float64,
                              device=rider.device if dist_backend_needs_device() else "cpu")
        ballot[0] = rider.to(ballot.device)  # a copy off the GPU when a single process votes on the CPU
        total, sigterm, sigint, capped_any, seconds_sum, ranks = all_reduce_sum(ballot).tolist()
        agreed = seconds_sum / ranks
        self.last = Vote(done, agreed, (agreed - self.last.seconds) / (done - self.last.step))
        self.next = self._plan()
        if done >= cfg.steps:  # the run is complete: nothing left to stop
            return total, None
        stop = Stop.SIGTERM if sigterm else Stop.SIGINT if sigint else Stop.WALLCLOCK if capped_any else None
        return total, stop

    def _plan(self) -> float:
        """The step count after which to hold the next vote of our own (inf: none)."""
        last, cap = self.last, self.cfg.max_wallclock
        if last.step_seconds is None:  # no step timed yet: under a cap, time the first one
            return last.step + 1 if cap else math.inf
        per_step = max(last.step_seconds, 1e-9)
        steps = VOTE_SECONDS / per_step
        if cap:
            steps = min(steps, (cap - last.seconds) / per_step / 2)
        return last.step + max(1, int(min(steps, self.cfg.steps)))


def claim_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse to start a new run in a folder that holds one, unless overwrite: then its files go first
    (so metrics.jsonl and train.log start empty rather than appended to)."""
    found = [name for name in RUN_FILES if (Path(run_dir) / name).exists()]
    if found and not overwrite:
        raise ValueError(f"{run_dir}: holds a run ({', '.join(found)}); continue it with --resume {run_dir}, "
                         f"train into a new --out, or pass --overwrite to replace it")
    for name in found:
        (Path(run_dir) / name).unlink()


def resume_config(run_dir: Path, overrides: dict) -> Config:
    """The config of RUN's checkpoint; flags may change only run-control fields, not the model or data."""
    path = run_dir / CHECKPOINT_NAME
    state = read_checkpoint(path)
    try:
        cfg = config_from_dict(state["config"], str(path))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad config ({e})") from None
    check_saved_config(run_dir, cfg)
    for name, value in overrides.items():
        if name not in RESUMABLE_FIELDS and getattr(cfg, name) != value:
            raise CheckpointError(f"{path}: saved with {name}={getattr(cfg, name)!r}, "
                                  f"asked for {value!r}; a resumed run keeps its config")
        setattr(cfg, name, value)
    cfg.validate()  # setattr skipped it
    return cfg


def check_saved_config(run_dir: Path, cfg: Config) -> None:
    """RUN/config.json, where there is one, must agree with the checkpoint's config on every field
    a resumed run may not change."""
    path = run_dir / "config.json"
    saved = read_json_object(path, CheckpointError)
    if saved is None:
        return
    # grad_accum follows the process count when global_batch_rows fixes the batch
    free = RESUMABLE_FIELDS | ({"grad_accum"} if cfg.global_batch_rows else set())
    ours = cfg.to_dict()
    changed = sorted(k for k in set(saved) | set(ours) if k not in free and saved.get(k) != ours.get(k))
    if changed:
        name = changed[0]
        raise CheckpointError(f"{path}: {name}={saved.get(name)!r}, but {run_dir / CHECKPOINT_NAME} was saved "
                              f"with {name}={ours.get(name)!r}; a resumed run keeps its model and data config")


def train(cfg: Config, data_dir: Path, out_dir: Path, tokenizer_path: Path, *, run_eval: bool = True,
          resume: bool = False, device: torch.device | None = None,
          echo: Callable[[str], None] = print) -> dict:
    """Train on DIR's train shards (one process or torchrun), save RUN/model.pt, evaluate."""
    env = init_distributed(device)
    device = env.device
    cfg = cfg.for_world(env.world_size)
    out_dir = Path(out_dir)
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    state = read_checkpoint(out_dir / CHECKPOINT_NAME) if resume else None
    byte_table = ByteTable.from_tokenizer(load_tokenizer(tokenizer_path), cfg.vocab_size)
    val_tokens = load_split(data_dir, "val", cfg.vocab_size) if run_eval or cfg.val_every else None
    loader = ShardedLoader(shard_paths(data_dir, "train"), cfg.seq_len, cfg.layout, cfg.pad_id,
                           cfg.vocab_size, cfg.seed, shards_per_group=cfg.shards_per_group,
                           batches_per_group=cfg.batches_per_group or None, rank=env.rank,
                           world_size=env.world_size, batch_rows=cfg.batch_rows)

    torch.manual_seed(cfg.seed)
    model = MDLM(cfg).to(device)
    optimizer = build_optimizer(model, cfg, device)
    ema = WeightEMA(model, cfg.ema) if cfg.ema else None
    start_step, trained_seconds = 0, 0.0
    if state is not None:
        if state.get("world_size", 1) != env.world_size and not cfg.global_batch_rows:
            raise CheckpointError(f"{out_dir / CHECKPOINT_NAME}: saved by {state.get('world_size', 1)} "
                                  f"process(es), resumed by {env.world_size}: that would change the global "
                                  f"batch; resume with the same count or set --global-batch-rows")
        restore_training_state(state, model, optimizer, ema, loader, out_dir / CHECKPOINT_NAME)
        start_step, trained_seconds = state["step"], state["train_seconds"]
    objective = build_objective(model, cfg, env)

    log = RunLog(out_dir, cfg.steps, echo, enabled=env.is_main)
    if env.is_main:
        cfg.save(out_dir / "config.json")
        if resume:
            log.truncate_metrics(start_step)
            log.line(f"resumed from {out_dir / CHECKPOINT_NAME} at step {start_step}")
    for line in describe_run(cfg, model, device, loader.total_tokens, env.world_size):
        log.line(line)
    log.line("loader: " + loader.describe())
    loader.on_wait = lambda e: log.line(
        f"data: epoch {e['epoch']} group {e['group']} ({', '.join(e['shards'])}): "
        f"waited {e['wait_s']:.3f}s for a {e['load_s']:.2f}s load")

    def save_training_checkpoint(done: int, seconds: float) -> None:
        if env.is_main:
            save_checkpoint(out_dir / CHECKPOINT_NAME, model, cfg, step=done, train_seconds=seconds,
                            world_size=env.world_size,
                            optimizer=optimizer.state_dict(), loader=loader.state_dict(),
                            ema=ema.state_dict() if ema else None,
                            rng={"torch": torch.get_rng_state()},
                            tokenizer=str(Path(tokenizer_path).resolve()))
        barrier()

    def validate(done: int, elapsed: float) -> None:
        """The run's own eval on the weights that would ship, off the training clock, to metrics.jsonl."""
        results = evaluate(shipped_model(model, ema), val_tokens, byte_table, cfg, steps=cfg.elbo_steps,
                           num_seqs=cfg.eval_num_seqs, seed=cfg.seed, modes=HEADLINE_MODES)
        r = headline(results)
        log.line(f"val step {done}: {format_result(r)}")
        log.record(step=done, val_bpb=r["bpb"], val_kind=r["kind"],
                   tokens=done * cfg.tokens_per_step * env.world_size, elapsed_s=elapsed)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    if cfg.compile:
        log.line(f"compile: warm-up took {warm_up(objective, model, cfg, env, autocast):.1f}s "
                 f"(off the training clock)")
    clock = TrainClock(device, trained_seconds)
    speed = Speed(cfg, model, device, env.world_size, start_step, trained_seconds)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    first_bad_step = torch.zeros((), device=device, dtype=torch.long)
    losses: list[float] = []
    stop, done, last_log, seconds = Stop.STEPS, start_step, start_step, trained_seconds
    with StopSignal() as stop_signal:
        control = RunControl(cfg, start_step, trained_seconds, stop_signal)
        for step in range(start_step, cfg.steps):
            scale = lr_factor(step, cfg, control.seconds_at(step))
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * scale
            step_loss = train_step(objective, model, optimizer, loader, cfg, step, env, autocast)
            if ema:
                ema.update()
            loss_sum += step_loss
            first_bad_step = torch.where((first_bad_step == 0) & ~torch.isfinite(step_loss),
                                         step + 1, first_bad_step)
            log.advance()
            done = step + 1
            at_checkpoint = bool(cfg.checkpoint_every) and done % cfg.checkpoint_every == 0
            at_log = done % cfg.log_every == 0 or done == cfg.steps or at_checkpoint
            at_val = bool(cfg.val_every) and done % cfg.val_every == 0
            if not (at_log or at_val or control.due(done)):
                continue  # no host sync on this step
            seconds = clock.read()
            loss_total, reason = control.vote(done, seconds, loss_sum)  # the host sync
            if not math.isfinite(loss_total):
                log.close()
                loader.close()
                raise non_finite_loss(loss_total / (done - last_log), first_bad_step, done)
            if at_log or reason:
                loss, lr = loss_total / (done - last_log), cfg.lr * scale
                measured = speed.measure(done, seconds)
                log.line(step_line(done, cfg, loss, lr, measured))
                log.record(step=done, loss=loss, lr=lr, **measured, elapsed_s=seconds,
                           data_wait_s=loader.stats["wait_s_total"])
                losses.append(loss)
                loss_sum.zero_()
                last_log = done
            with clock.paused():  # evaluation and checkpoints are off the clock
                if cfg.val_every and (at_val or done == cfg.steps or reason):
                    validate(done, seconds)
                if at_checkpoint:
                    save_training_checkpoint(done, seconds)
            if reason:
                stop = reason
                break
    train_seconds = clock.read()
    loader.close()
    stop_reason = stop.describe(cfg, seconds)
    log.line(f"stopped at step {done}: {stop_reason}; training time {train_seconds:.1f}s")
    summary = {"steps": done, "train_seconds": train_seconds, "stop_reason": stop_reason,
               "num_params": model.num_params(), "losses": losses,
               "tokens": done * cfg.tokens_per_step * env.world_size}
    if stop.resumable:
        save_training_checkpoint(done, train_seconds)
        log.line(f"checkpoint written; continue with: mdlm-golf train --resume {out_dir} --data {data_dir}")
        log.close()
        return summary
    final = shipped_model(model, ema)
    if env.is_main:
        save_checkpoint(run_checkpoint(out_dir), final, cfg, step=done,
                        tokenizer=str(Path(tokenizer_path).resolve()))
    if run_eval:
        results = evaluate(final, val_tokens, byte_table, cfg, steps=cfg.elbo_steps,
                           num_seqs=cfg.eval_num_seqs, seed=cfg.seed)
        for r in results.values():
            log.line("eval " + format_result(r))
        if env.is_main:
            write_text_atomic(out_dir / "eval.json", json.dumps(results, indent=2) + "\n")
        summary["eval"] = results
    log.close()
    return summary


def non_finite_loss(loss: float, first_bad_step: torch.Tensor, done: int) -> FloatingPointError:
    """The error for a non-finite loss, naming the first step this rank saw it (or that another did)."""
    bad = int(first_bad_step.item())
    where = f"at step {bad}" if bad else f"on another rank by step {done}"
    return FloatingPointError(f"loss became {loss} {where}; stopped without writing a checkpoint or model")


def shipped_model(model: MDLM, ema: WeightEMA | None) -> MDLM:
    """The weights eval, export and sampling use: the EMA's when there is one (a copy), else the model."""
    if ema is None:
        return model
    copy = MDLM(model.cfg).to(next(model.parameters()).device)
    copy.load_state_dict(ema.averaged_state(model))
    return copy


def build_objective(model: MDLM, cfg: Config, env: DistEnv) -> torch.nn.Module:
    """Model + loss, compiled when cfg.compile (FlexAttention document masks on CUDA), DDP-wrapped
    under torchrun."""
    objective = Objective(model, cfg)
    if cfg.compile:
        model.use_flex = env.device.type == "cuda"
        objective = torch.compile(objective)
    if env.distributed:
        objective = DDP(objective, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    return objective


def train_step(objective: torch.nn.Module, model: MDLM, optimizer: Optimizers,
               loader: ShardedLoader, cfg: Config, step: int, env: DistEnv, autocast) -> torch.Tensor:
    """One optimizer step over grad_accum micro-batches; returns the step's loss share of this rank
    (a device tensor: reading it is left to the log steps)."""
    device = env.device
    noise = step_noise(cfg, step, env.world_size, device)
    batches = [to_device(loader.next_rows(cfg.batch_rows), device) for _ in range(cfg.grad_accum)]
    noises = [noise.rows(global_row_ids(m, cfg.batch_rows, env.rank, env.world_size).to(device))
              for m in range(cfg.grad_accum)]
    # normalize by the scored tokens of the whole global batch, so any split gives one loss
    scored = sum(scored_count(x0, cfg, n) for x0, n in zip(batches, noises))
    scored = all_reduce_sum(scored.double()).clamp(min=1)
    step_loss = torch.zeros((), device=device, dtype=torch.float64)
    for micro, (x0, n) in enumerate(zip(batches, noises)):
        last = micro == cfg.grad_accum - 1
        with (objective.no_sync() if env.distributed and not last else nullcontext()), autocast:
            weighted_sum, _ = objective(x0, n.t, n.mask_u, n.anchor_u)
        # DDP averages gradients over ranks; scaling by world size makes that a sum
        (weighted_sum * (env.world_size / scored)).backward()
        step_loss += weighted_sum.detach().double() / scored
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss


def warm_up(objective: torch.nn.Module, model: MDLM, cfg: Config, env: DistEnv, autocast) -> float:
    """Compile with one forward/backward on synthetic rows of the training shape; changes nothing."""
    began = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randint(2, cfg.vocab_size, (cfg.batch_rows, cfg.seq_len), generator=generator)
    x0[:, 0] = BOS_ID
    noise = draw_noise(cfg.batch_rows, cfg.seq_len, torch.Generator(env.device).manual_seed(0))
    with autocast:
        weighted_sum, _ = objective(x0.to(env.device), noise.t, noise.mask_u, noise.anchor_u)
    weighted_sum.backward()
    model.zero_grad(set_to_none=True)
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)
    return time.perf_counter() - began


def restore_training_state(state: dict, model: MDLM, optimizer: Optimizers, ema: WeightEMA | None,
                           loader: ShardedLoader, path: Path) -> None:
    """Model, optimizer, EMA, loader position and RNG from a training checkpoint (one-line errors)."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"]["torch"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot resume from it ({str(e).splitlines()[0]})") from None
