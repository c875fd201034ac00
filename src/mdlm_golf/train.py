"""The training loop: one train(cfg) whose step reads top to bottom."""
from __future__ import annotations

import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from .checkpoint import CheckpointError, read_checkpoint, run_checkpoint, save_checkpoint
from .config import BOS_ID, Config, config_from_dict
from .files import write_text_atomic
from .data import ByteTable, load_split, load_tokenizer, shard_paths
from .diffusion import Noise, draw_noise
from .dist import DistEnv, all_reduce_sum, barrier, dist_backend_needs_device, init_distributed, to_device
from .evaluate import HEADLINE_MODES, evaluate, format_result, headline
from .loader import ShardedLoader
from .model import MDLM
from .objective import Objective, scored_count
from .optim import Optimizers, WeightEMA, build_optimizer

CHECKPOINT_NAME = "checkpoint.pt"  # training state for --resume; model.pt holds the final weights
# fields a resumed run may change: how long and how it logs, not what it trains
RESUMABLE_FIELDS = {"steps", "max_wallclock", "log_every", "checkpoint_every", "elbo_steps",
                    "eval_num_seqs", "eval_batch_rows"}
# what a run folder holds: a new run refuses a folder with any of them (the CLI's --overwrite deletes them)
RUN_FILES = ("model.pt", CHECKPOINT_NAME, "config.json", "metrics.jsonl", "train.log", "eval.json")
STOP_SIGNALS = ("SIGTERM", "SIGINT")  # stop reasons that checkpoint for --resume instead of finishing


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


def describe_run(cfg: Config, model: MDLM, device: torch.device, tokens: int, world_size: int) -> list[str]:
    return [
        f"mdlm-golf {git_revision()} | python {platform.python_version()} | torch {torch.__version__} "
        f"| numpy {np.__version__} | device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        f"model: {model.num_params():,} parameters ({cfg.num_layers} layers, width {cfg.model_dim}, "
        f"{cfg.num_heads} heads, MLP x{cfg.mlp_mult}, seq {cfg.seq_len})",
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
    """SIGTERM or a first Ctrl-C (SIGINT) asks for a checkpoint and a clean exit at the next step
    boundary; a second Ctrl-C aborts at once. The previous handlers come back on exit."""

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
                os.write(2, b"\nCtrl-C: stopping at the next step boundary with a checkpoint "
                            b"(Ctrl-C again aborts without one)\n")
            except OSError:
                pass

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            if handler is not None:  # None: set outside Python, cannot be restored from here
                signal.signal(signum, handler)


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
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not JSON ({e})") from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: not a JSON object")
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
    clock = time.perf_counter() - trained_seconds  # training time only: checkpoints are taken off it
    last_time, last_step = time.perf_counter(), start_step
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    first_bad_step = torch.zeros((), device=device, dtype=torch.long)
    losses: list[float] = []
    stop_reason, done, agreed_elapsed = f"reached {cfg.steps} steps", start_step, trained_seconds
    with StopSignal() as stop_signal:
        for step in range(start_step, cfg.steps):
            scale = lr_factor(step, cfg, agreed_elapsed)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * scale
            step_loss = train_step(objective, model, optimizer, loader, cfg, step, env, autocast)
            if ema:
                ema.update()
            loss_sum += step_loss
            first_bad_step = torch.where((first_bad_step == 0) & ~torch.isfinite(step_loss),
                                         step + 1, first_bad_step)

            done = step + 1
            elapsed = time.perf_counter() - clock
            reason, agreed_elapsed = (stop_request(cfg, elapsed, stop_signal.received, device)
                                      if done < cfg.steps else (None, elapsed))
            at_checkpoint = cfg.checkpoint_every and done % cfg.checkpoint_every == 0
            if done % cfg.log_every == 0 or done == cfg.steps or at_checkpoint or reason:
                loss = all_reduce_sum(loss_sum.clone()).item() / (done - last_step)  # the step's host sync
                if first_bad_step.item():
                    log.close()
                    loader.close()
                    raise FloatingPointError(f"loss became {loss} at step {first_bad_step.item()}; "
                                             f"stopped without writing a checkpoint or model")
                now = time.perf_counter()
                tok_s = (done - last_step) * cfg.tokens_per_step * env.world_size / (now - last_time)
                lr = cfg.lr * scale
                log.line(f"step {done}/{cfg.steps} | loss {loss:.4f} | lr {lr:.2e} | "
                         f"tok/s {tok_s:,.0f} | elapsed {elapsed:.1f}s")
                log.record(step=done, loss=loss, lr=lr, tokens_per_s=tok_s, elapsed_s=elapsed,
                           data_wait_s=loader.stats["wait_s_total"])
                losses.append(loss)
                loss_sum.zero_()
                last_time, last_step = now, done
            paused = time.perf_counter()
            if cfg.val_every and (done % cfg.val_every == 0 or done == cfg.steps or reason):
                validate(done, elapsed)
            if at_checkpoint:
                save_training_checkpoint(done, elapsed)
            clock += time.perf_counter() - paused  # evaluation and checkpoints are off the clock
            last_time += time.perf_counter() - paused
            log.advance()
            if reason:
                stop_reason = reason
                break
    train_seconds = time.perf_counter() - clock
    loader.close()
    log.line(f"stopped at step {done}: {stop_reason}; training time {train_seconds:.1f}s")
    summary = {"steps": done, "train_seconds": train_seconds, "stop_reason": stop_reason,
               "num_params": model.num_params(), "losses": losses,
               "tokens": done * cfg.tokens_per_step * env.world_size}
    if stop_reason.startswith(STOP_SIGNALS):
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


def stop_request(cfg: Config, elapsed: float, signalled: str | None,
                 device: torch.device) -> tuple[str | None, float]:
    """(why to stop now, training seconds), agreed by all ranks: any rank's SIGTERM, Ctrl-C or clock
    stops every rank, and the mean clock keys every rank's lr schedule alike under --max-wallclock."""
    flags = torch.tensor([float(signalled == "SIGTERM"), float(signalled == "SIGINT"),
                          float(bool(cfg.max_wallclock) and elapsed >= cfg.max_wallclock),
                          elapsed, 1.0], dtype=torch.float64,
                         device=device if dist_backend_needs_device() else "cpu")
    sigterm_any, sigint_any, clock_any, elapsed_sum, ranks = all_reduce_sum(flags).tolist()
    agreed = elapsed_sum / ranks
    if sigterm_any:
        return "SIGTERM received", agreed
    if sigint_any:
        return "SIGINT (Ctrl-C) received", agreed
    if clock_any:
        return f"wall-clock cap of {cfg.max_wallclock:g}s reached after {elapsed:.1f}s of training", agreed
    return None, agreed


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
