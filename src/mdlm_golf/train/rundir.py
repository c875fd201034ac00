"""The run folder: what it holds, claiming it for a new run, and the training checkpoint that --resume
continues from (its config checked against RUN/config.json and the flags)."""
from __future__ import annotations

import dataclasses
import os
import shutil
from contextlib import suppress
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from ..config import Config, config_from_dict, with_defaults
from ..data import ShardedLoader
from ..files import hidden_temp_folder, read_json_object
from ..model import Transformer
from .optim import Optimizers, WeightEMA

CHECKPOINT_NAME = "checkpoint.pt"  # training state for --resume; model.pt holds the final weights
# fields a resumed run may change: how long and how it logs, not what it trains
RESUMABLE_FIELDS = {"steps", "max_wallclock", "log_every", "checkpoint_every", "elbo_steps",
                    "eval_num_seqs", "eval_batch_rows"}
# what a run folder holds: a new run refuses a folder with any of them (the CLI's --overwrite replaces them)
RUN_FILES = ("model.pt", CHECKPOINT_NAME, "config.json", "metrics.jsonl", "train.log", "eval.json")


def check_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse to start a new run in a folder that holds one, unless overwrite (train(replace=True) then
    sets it aside once the data and tokenizer have been opened, and deletes it only once the new run has
    finished: neither bad input nor a full disk costs the old run)."""
    found = [name for name in RUN_FILES if (Path(run_dir) / name).exists()]
    if found and not overwrite:
        raise ValueError(f"{run_dir}: holds a run ({', '.join(found)}); continue it with --resume {run_dir}, "
                         f"train into a new --out, or pass --overwrite to replace it")


def set_aside_run(run_dir: Path) -> Path:
    """Move an old run's files into a hidden folder inside RUN (renames: no space needed), so the new
    run's metrics.jsonl and train.log start empty; restore_run puts them back if the new run fails (a
    full disk costs nothing), drop_set_aside deletes them once it has finished."""
    run_dir = Path(run_dir)
    aside = hidden_temp_folder(run_dir, "replaced")
    for name in RUN_FILES:
        if (run_dir / name).exists():
            os.replace(run_dir / name, aside / name)
    return aside


def restore_run(run_dir: Path, aside: Path) -> None:
    """Undo set_aside_run after the new run failed: its files go, the old run's come back. Best effort,
    so that the error that ended the run is the one reported."""
    with suppress(OSError):
        for name in RUN_FILES:
            (Path(run_dir) / name).unlink(missing_ok=True)
        for path in aside.iterdir():
            os.replace(path, Path(run_dir) / path.name)
        aside.rmdir()


def drop_set_aside(aside: Path) -> None:
    """The new run finished (or checkpointed on a signal, to resume): the old run goes."""
    shutil.rmtree(aside, ignore_errors=True)


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
    cfg = dataclasses.replace(cfg, **overrides)  # validated as any new config is
    if cfg.steps < state.get("step", 0):
        raise CheckpointError(f"{path}: saved at step {state['step']}; --steps {cfg.steps} is fewer than the "
                              f"steps done (a resumed run trains on to --steps)")
    return cfg


def check_saved_config(run_dir: Path, cfg: Config) -> None:
    """RUN/config.json, where there is one, must agree with the checkpoint's config on every field
    a resumed run may not change."""
    path = run_dir / "config.json"
    saved = read_json_object(path, CheckpointError)
    if saved is None:
        return
    try:  # read as a config is (defaults for fields added since, one spelling of each value)
        saved = config_from_dict(with_defaults(saved), str(path)).to_dict()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad config ({e})") from None
    # grad_accum follows the process count when global_batch_rows fixes the batch
    free = RESUMABLE_FIELDS | ({"grad_accum"} if cfg.global_batch_rows else set())
    ours = cfg.to_dict()
    changed = sorted(k for k in set(saved) | set(ours) if k not in free and saved.get(k) != ours.get(k))
    if changed:
        name = changed[0]
        raise CheckpointError(f"{path}: {name}={saved.get(name)!r}, but {run_dir / CHECKPOINT_NAME} was saved "
                              f"with {name}={ours.get(name)!r}; a resumed run keeps its model and data config")


def save_training_state(path: Path, model: Transformer, cfg: Config, optimizer: Optimizers, ema: WeightEMA | None,
                        loader: ShardedLoader, *, step: int, seconds: float, world_size: int,
                        tokenizer: str) -> None:
    """RUN/checkpoint.pt: everything --resume needs after `step` steps and `seconds` of training."""
    save_checkpoint(path, model, cfg, step=step, train_seconds=seconds, world_size=world_size,
                    optimizer=optimizer.state_dict(), loader=loader.state_dict(),
                    ema=ema.state_dict() if ema else None, rng={"torch": torch.get_rng_state()},
                    tokenizer=tokenizer)


def restore_training_state(state: dict, path: Path, cfg: Config, world_size: int, model: Transformer,
                           optimizer: Optimizers, ema: WeightEMA | None,
                           loader: ShardedLoader) -> tuple[int, float]:
    """Model, optimizer, EMA, loader position and RNG from a training checkpoint (one-line errors);
    returns its step and training seconds."""
    if state.get("world_size", 1) != world_size and not cfg.global_batch_rows:
        raise CheckpointError(f"{path}: saved by {state.get('world_size', 1)} process(es), resumed by "
                              f"{world_size}: that would change the global batch; resume with the same "
                              f"count or set --global-batch-rows")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"]["torch"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot resume from it ({str(e).splitlines()[0]})") from None
    return state["step"], state["train_seconds"]
