"""The training loop: one train(cfg) whose step reads top to bottom, and the step itself."""
from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from ..checkpoint import CheckpointError, check_weights_fit, read_checkpoint, run_checkpoint, save_checkpoint
from ..config import BOS_ID, Config
from ..data import (ByteTable, ShardedLoader, check_batch_fits, check_manifest_tokens, load_split, load_tokenizer,
                    read_shard_set, shard_paths)
from ..diffusion import Noise, draw_noise
from ..dist import DistEnv, all_reduce_sum, autocast, barrier, init_distributed, process_group_active, shutdown, to_device
from ..eval import HEADLINE_MODES, evaluate, format_headline, format_result, headline
from ..files import write_text_atomic
from ..model import Transformer
from ..objective import LossModule, Prepare, loss_name, objective_for
from .control import Due, RunControl, Stop, StopSignal, TrainClock
from .optim import Optimizers, WeightEMA, build_optimizer, lr_factor
from .rundir import (CHECKPOINT_NAME, drop_set_aside, restore_run, restore_training_state, save_training_state,
                     set_aside_run)
from .runlog import RunLog, StepMeter, describe_run


def train(cfg: Config, data_dir: Path, out_dir: Path, tokenizer_path: Path, *, run_eval: bool = True,
          resume: bool = False, replace: bool = False, device: torch.device | None = None,
          echo: Callable[[str], None] = print) -> dict:
    """Train on DIR's train shards (one process or torchrun), save RUN/model.pt, evaluate.
    replace: an old run in RUN is set aside once the data, tokenizer and model are ready, and deleted once
    this run has its model or checkpoint (restored if it fails first). Whatever happens, the run's log and
    prefetch thread are released, and the torchrun process group too when this call opened it (a caller
    that opened it keeps it, e.g. to evaluate after)."""
    owns_group = not process_group_active()
    env = init_distributed(device)
    finished = False
    try:
        run = open_run(cfg.for_world(env.world_size), env, data_dir, Path(out_dir), tokenizer_path,
                       resume=resume, replace=replace, run_eval=run_eval, echo=echo)
        try:
            summary = run_steps(run, data_dir, run_eval)
        finally:
            run.close()
            settle_replaced_run(run)
        finished = True
        return summary
    finally:
        if owns_group:
            shutdown(clean=finished)


def settle_replaced_run(run: "Run") -> None:
    """--overwrite: the old run goes once the new one has saved its model (or its checkpoint, to resume,
    on a signal); a new run that failed before that gives the old one back."""
    if run.replaced is None:
        return
    if any((run.out_dir / name).exists() for name in ("model.pt", CHECKPOINT_NAME)):
        drop_set_aside(run.replaced)
    else:
        restore_run(run.out_dir, run.replaced)


def run_steps(run: "Run", data_dir: Path, run_eval: bool) -> dict:
    """The training loop from the run's first step, then finish(): the model, or a checkpoint to resume."""
    cfg, env, model, optimizer, ema, loader, log = run.cfg, run.env, run.model, run.optimizer, run.ema, run.loader, run.log
    if cfg.compile:
        log.line(f"compile: warm-up took {warm_up(run.loss, run.prepare, model, cfg, env):.1f}s "
                 f"(off the training clock)")
    clock = TrainClock(env.device, run.seconds)
    meter = StepMeter(cfg, model, env.device, env.world_size, run.step, run.seconds)
    stop, done, seconds = Stop.STEPS, run.step, run.seconds
    with StopSignal() as stop_signal:
        control = RunControl(cfg, run.step, run.seconds, stop_signal)
        for step in range(run.step, cfg.steps):
            scale = lr_factor(step, cfg, control.seconds_at(step))
            optimizer.set_lr_factor(scale)
            step_loss = train_step(run.loss, run.prepare, model, optimizer, loader, cfg, step, env)
            if ema:
                ema.update()
            meter.add(step, step_loss)
            log.advance()
            done = step + 1
            due = Due.after(done, cfg)
            if not (due.log or due.val or control.due(done)):
                continue  # no host sync on this step
            seconds = clock.read()
            loss_total, reason = control.vote(done, seconds, meter.loss_sum)  # the host sync
            if not math.isfinite(loss_total):
                raise meter.non_finite(loss_total, done)
            if due.log or reason:
                loss, speed = meter.measure(done, seconds, loss_total)
                log.step(done, cfg, loss, cfg.lr * scale, speed, seconds, loader.stats["wait_s_total"])
            with clock.paused():  # evaluation and checkpoints are off the clock
                if cfg.val_every and (due.val or done == cfg.steps or reason):
                    run.validate(done, seconds)
                if due.checkpoint:
                    run.save_checkpoint(done, seconds)
            if reason:
                stop = reason
                break
    return finish(run, stop, done, seconds, clock.read(), meter.losses, data_dir, run_eval)


def train_step(loss_module: torch.nn.Module, prepare: Prepare, model: Transformer, optimizer: Optimizers,
               loader: ShardedLoader, cfg: Config, step: int, env: DistEnv) -> torch.Tensor:
    """One optimizer step over grad_accum micro-batches; returns the step's loss share of this rank
    (a device tensor: reading it is left to the log steps)."""
    device = env.device
    noise = step_noise(cfg, step, env.world_size, device)
    batches = [prepare(to_device(loader.next_rows(cfg.batch_rows), device),
                       noise.rows(global_row_ids(m, cfg.batch_rows, env.rank, env.world_size).to(device)), step)
               for m in range(cfg.grad_accum)]
    # normalize by the scored tokens of the whole global batch, so any split gives one loss
    scored = all_reduce_sum(sum(batch.scored for batch in batches).double()).clamp(min=1)
    step_loss = torch.zeros((), device=device, dtype=torch.float64)
    for micro, batch in enumerate(batches):
        last = micro == cfg.grad_accum - 1
        with (loss_module.no_sync() if env.distributed and not last else nullcontext()), autocast(env.device):
            weighted_sum = loss_module(*batch.loss_args())
        # DDP averages gradients over ranks; scaling by world size makes that a sum
        (weighted_sum * (env.world_size / scored)).backward()
        step_loss += weighted_sum.detach().double() / scored
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss


def step_noise(cfg: Config, step: int, world_size: int, device: torch.device) -> Noise:
    """All noise of one optimizer step, drawn for the global batch from a (seed, step) generator on
    the training device: every split of the batch over ranks and micro-steps sees the same draws,
    resuming needs no generator state, and the GPU never waits for a host-to-device copy."""
    generator = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step)
    noise = draw_noise(cfg.batch_rows * cfg.grad_accum * world_size, cfg.seq_len, generator, cfg.time_sampling,
                       cfg.subtokens)
    if step < cfg.time_warmup_steps:  # early on, fewer near-fully-masked rows
        noise.t = noise.t * time_ceiling(step, cfg)
    return noise


def time_ceiling(step: int, cfg: Config) -> float:
    """The largest diffusion time of 0-based `step` under the time warmup: time_warmup_start rising
    linearly to 1 over time_warmup_steps steps (1 from then on)."""
    if step >= cfg.time_warmup_steps:
        return 1.0
    return cfg.time_warmup_start + (1.0 - cfg.time_warmup_start) * step / cfg.time_warmup_steps


def global_row_ids(micro: int, rows: int, rank: int, world_size: int) -> torch.Tensor:
    """Rows of the step's global batch that (rank, micro-step) holds, as the loader hands them out."""
    return micro * rows * world_size + rank + world_size * torch.arange(rows)


def build_loss_module(model: Transformer, cfg: Config, env: DistEnv) -> torch.nn.Module:
    """Model + loss, compiled when cfg.compile (FlexAttention document masks on CUDA), DDP-wrapped
    under torchrun."""
    loss_module = LossModule(model, flex=cfg.compile and env.device.type == "cuda")
    if cfg.compile:
        loss_module = torch.compile(loss_module)
    if env.distributed:
        loss_module = DDP(loss_module, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    return loss_module


def warm_up(loss_module: torch.nn.Module, prepare: Prepare, model: Transformer, cfg: Config, env: DistEnv) -> float:
    """Compile with one forward/backward on synthetic rows of the training shape; changes nothing."""
    began = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randint(2, cfg.vocab_size, (cfg.batch_rows, cfg.seq_len), generator=generator)
    x0[:, 0] = BOS_ID
    noise = draw_noise(cfg.batch_rows, cfg.seq_len, torch.Generator(env.device).manual_seed(0), digits=cfg.subtokens)
    with autocast(env.device):
        weighted_sum = loss_module(*prepare(x0.to(env.device), noise).loss_args())
    weighted_sum.backward()
    model.zero_grad(set_to_none=True)
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)
    return time.perf_counter() - began


@dataclass
class Run:
    """One run's parts: what train() steps, logs, validates and saves; step and seconds are where
    training starts (0, or the resumed checkpoint's)."""
    cfg: Config
    env: DistEnv
    out_dir: Path
    tokenizer_path: Path
    byte_table: ByteTable
    val_tokens: np.ndarray | None
    loader: ShardedLoader
    model: Transformer
    optimizer: Optimizers
    ema: WeightEMA | None
    prepare: Prepare  # the objective: a micro-batch and its noise -> what the loss reads
    loss: torch.nn.Module  # model + loss (compiled, DDP-wrapped)
    log: RunLog
    step: int
    seconds: float
    replaced: Path | None = None  # the old run's files, set aside until this one has finished (--overwrite)

    def tokenizer(self) -> str:
        """The tokenizer's absolute path, as every checkpoint records it."""
        return str(Path(self.tokenizer_path).resolve())

    def tokens(self, done: int) -> int:
        """Training tokens of `done` steps, over every rank."""
        return done * self.cfg.tokens_per_step * self.env.world_size

    def flops(self, done: int) -> int:
        """Training FLOPs of `done` steps, over every rank (the model's formula, per token)."""
        return self.tokens(done) * self.model.flops_per_token()

    def shipped_model(self) -> Transformer:
        """The weights eval, export and sampling use: the EMA's when there is one (a copy), else the model."""
        if self.ema is None:
            return self.model
        copy = Transformer(self.model.cfg).to(next(self.model.parameters()).device)
        copy.load_state_dict(self.ema.averaged_state(self.model))
        return copy

    def save_checkpoint(self, done: int, seconds: float) -> None:
        """RUN/checkpoint.pt, written by rank 0 while the others wait."""
        if self.env.is_main:
            save_training_state(self.out_dir / CHECKPOINT_NAME, self.model, self.cfg, self.optimizer,
                                self.ema, self.loader, step=done, seconds=seconds,
                                world_size=self.env.world_size, tokenizer=self.tokenizer())
        barrier()

    def validate(self, done: int, elapsed: float) -> None:
        """The run's own eval on the weights that would ship, off the training clock, to metrics.jsonl."""
        cfg = self.cfg
        results = evaluate(self.shipped_model(), self.val_tokens, self.byte_table, cfg, steps=cfg.elbo_steps,
                           num_seqs=cfg.eval_num_seqs, seed=cfg.seed, modes=HEADLINE_MODES)
        r = headline(results)
        self.log.line(f"val step {done}: {format_result(r)}")
        self.log.record(step=done, val_bpb=r["bpb"], val_kind=r["kind"], tokens=self.tokens(done),
                        flops=self.flops(done), elapsed_s=elapsed)

    def close(self) -> None:
        """Close the log and stop the loader's prefetch (again after finish() is harmless)."""
        self.log.close()
        self.loader.close()


def open_run(cfg: Config, env: DistEnv, data_dir: Path, out_dir: Path, tokenizer_path: Path, *,
             resume: bool, replace: bool, run_eval: bool, echo: Callable[[str], None]) -> Run:
    """Data, model, optimizer, EMA, objective (restored from RUN/checkpoint.pt on resume); the log begun.
    Every input is read and checked before an old run is cleared (replace) or the log is opened."""
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    state = read_checkpoint(out_dir / CHECKPOINT_NAME) if resume else None
    byte_table = ByteTable.from_tokenizer(load_tokenizer(tokenizer_path), cfg.vocab_size)
    val_tokens = load_split(data_dir, "val", cfg.vocab_size) if run_eval or cfg.val_every else None
    train_shards = shard_paths(data_dir, "train")
    _, source, counts = read_shard_set(train_shards)
    check_batch_fits(source, counts, cfg.batch_rows, cfg.seq_len, env.world_size)
    check_manifest_tokens(data_dir, "train", sum(counts))
    if state is not None:  # the checkpoint's weights must be its config's before that model is built
        check_weights_fit(out_dir / CHECKPOINT_NAME, cfg, {k: tuple(v.shape) for k, v in state["model"].items()
                                                          if isinstance(v, torch.Tensor)}, CheckpointError)
    torch.manual_seed(cfg.seed)
    model = Transformer(cfg).to(env.device)
    optimizer = build_optimizer(model, cfg, env.device)
    ema = WeightEMA(model, cfg.ema) if cfg.ema else None
    # every input opened without error: only now may the old run be set aside (deleted once this one ends)
    replaced = set_aside_run(out_dir) if replace and env.is_main else None
    log = loader = None
    step, seconds = 0, 0.0
    try:
        log = RunLog(out_dir, cfg.steps, echo, enabled=env.is_main)
        loader = ShardedLoader(train_shards, cfg.seq_len, cfg.layout, cfg.tokens.pad, cfg.vocab_size, cfg.seed,
                               shards_per_group=cfg.shards_per_group,
                               batches_per_group=cfg.batches_per_group or None, rank=env.rank,
                               world_size=env.world_size, batch_rows=cfg.batch_rows, on_wait=log.data_wait)
        if state is not None:
            step, seconds = restore_training_state(state, out_dir / CHECKPOINT_NAME, cfg, env.world_size, model,
                                                   optimizer, ema, loader)
        loss_module = build_loss_module(model, cfg, env)
        begin_log(log, cfg, env, model, loader, out_dir, resume, step)
    except BaseException:
        for part in (log, loader):
            if part is not None:
                part.close()
        if replaced is not None:
            restore_run(out_dir, replaced)
        raise
    return Run(cfg, env, out_dir, tokenizer_path, byte_table, val_tokens, loader, model, optimizer, ema,
               objective_for(cfg), loss_module, log, step, seconds, replaced)


def begin_log(log: RunLog, cfg: Config, env: DistEnv, model: Transformer, loader: ShardedLoader, out_dir: Path,
              resume: bool, step: int) -> None:
    """RUN/config.json, the resumed run's metrics cut back to its checkpoint, and the run's header lines."""
    if env.is_main:
        cfg.save(out_dir / "config.json")
        if resume:
            log.truncate_metrics(step)
            log.line(f"resumed from {out_dir / CHECKPOINT_NAME} at step {step}")
    for line in describe_run(cfg, model, env.device, loader.total_tokens, env.world_size):
        log.line(line)
    log.line("loader: " + loader.describe())
    log.line(f"loss: {loss_name(cfg)}, nats per scored token")


def finish(run: Run, stop: Stop, done: int, seconds: float, train_seconds: float, losses: list[float],
           data_dir: Path, run_eval: bool) -> dict:
    """After the last step: a checkpoint to resume from after a signal; else RUN/model.pt and its eval."""
    cfg, log = run.cfg, run.log
    run.loader.close()  # no more batches: stop the prefetch before the final save and eval
    stop_reason = stop.describe(cfg, seconds)
    log.line(f"stopped at step {done}: {stop_reason}; training time {train_seconds:.1f}s")
    summary = {"steps": done, "train_seconds": train_seconds, "stop_reason": stop_reason,
               "interrupted": stop.value if stop.resumable else None,  # the signal that stopped it, if one did
               "num_params": run.model.num_params(), "losses": losses, "tokens": run.tokens(done),
               "flops": run.flops(done)}
    if stop.resumable:
        run.save_checkpoint(done, train_seconds)
        log.line(f"checkpoint written; continue with: mdlm-golf train --resume {run.out_dir} "
                 f"--data {data_dir}")
    else:
        final = run.shipped_model()
        if run.env.is_main:
            save_checkpoint(run_checkpoint(run.out_dir), final, cfg, step=done, tokenizer=run.tokenizer())
        if run_eval:
            summary["eval"] = final_eval(run, final)
    log.close()
    return summary


def final_eval(run: Run, final: Transformer) -> dict:
    """Every eval mode on the shipped weights, to the log and RUN/eval.json."""
    cfg = run.cfg
    results = evaluate(final, run.val_tokens, run.byte_table, cfg, steps=cfg.elbo_steps,
                       num_seqs=cfg.eval_num_seqs, seed=cfg.seed)
    for r in results.values():
        run.log.line("eval " + format_result(r))
    run.log.line("eval " + format_headline(results))
    if run.env.is_main:
        write_text_atomic(run.out_dir / "eval.json", json.dumps(results, indent=2) + "\n")
    return results
