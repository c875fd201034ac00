"""Saving and loading model checkpoints atomically, with one-line errors for bad files."""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from .config import Config, config_from_dict
from .files import atomic_path
from .model import MDLM

FORMAT = "mdlm-golf-checkpoint-v1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file."""


def save_checkpoint(path: Path, model: MDLM, cfg: Config, **extra) -> None:
    """torch.save to a temporary file, then rename: a crash mid-write keeps the previous file."""
    path = Path(path)
    state = {"format": FORMAT, "config": cfg.to_dict(), "model": model.state_dict(), **extra}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def read_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an mdlm-golf checkpoint")
    return state


def load_model(path: Path, device: torch.device | str = "cpu") -> tuple[MDLM, Config, dict]:
    """The model, its config and the whole checkpoint dict."""
    state = read_checkpoint(path)
    try:
        cfg = config_from_dict(state["config"], str(path))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad config ({e})") from None
    model = MDLM(cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match its config ({str(e).splitlines()[0]})") from None
    return model.to(device), cfg, state


def run_checkpoint(run_dir: Path) -> Path:
    """The final checkpoint of a run folder."""
    return Path(run_dir) / "model.pt"
