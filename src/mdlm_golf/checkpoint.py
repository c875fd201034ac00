"""Saving and loading model checkpoints atomically, with one-line errors for bad files.

File format: the zip archive torch.save writes, whose zip comment (the archive's last bytes) is SEAL
followed by the hex sha256 of every byte before the comment. The file stays a valid zip that torch.load
and zip tools read; any changed bit is a checksum mismatch. Loading is weights-only, so a file can
hold tensors and plain Python values but nothing that runs code when it is read.
"""
from __future__ import annotations

import errno
import hashlib
import os
import struct
from pathlib import Path
from typing import BinaryIO

import torch

from .config import Config, config_from_dict
from .files import atomic_path
from .model import Transformer, parameter_shapes

FORMAT = "mdlm-golf-checkpoint-v1"  # the layout of the saved dict
SEAL = b"mdlm-golf-checkpoint-v2 sha256:"  # the container: torch's zip with a checksum comment
COMMENT_BYTES = len(SEAL) + 64  # SEAL + hex digest
ZIP_END = b"PK\x05\x06"  # signature of the zip end record, 22 bytes when there is no comment
ZIP_END_BYTES = 22


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file."""


def sha256_prefix(f: BinaryIO, count: int) -> bytes:
    """Hex sha256 of the first `count` bytes of an open file, read in chunks (checkpoints can be large)."""
    f.seek(0)
    digest = hashlib.sha256()
    while count > 0:
        chunk = f.read(min(count, 1 << 24))
        if not chunk:
            break
        digest.update(chunk)
        count -= len(chunk)
    return digest.hexdigest().encode()


def seal_file(path: Path) -> None:
    """Seal the zip torch.save wrote at `path`: a zip comment holding the sha256 of all bytes before it."""
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(max(0, size - ZIP_END_BYTES))
        end = f.read()
        if len(end) < ZIP_END_BYTES or not end.startswith(ZIP_END) or not end.endswith(b"\0\0"):
            raise ValueError(f"{path}: not a zip file with an empty comment at its end; cannot seal it")
        f.seek(size - 2)
        f.write(struct.pack("<H", COMMENT_BYTES))  # the end record's comment length, covered by the digest
        digest = sha256_prefix(f, size)
        f.seek(size)
        f.write(SEAL + digest)


def save_checkpoint(path: Path, model: Transformer, cfg: Config, **extra) -> None:
    """torch.save to a temporary file, seal it, then rename: a crash or a full disk mid-write keeps the
    previous file (and leaves no temporary)."""
    path = Path(path)
    state = {"format": FORMAT, "config": cfg.to_dict(), "model": model.state_dict(), **extra}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: a full disk is OSError(ENOSPC), not torch's RuntimeError
            save_into(state, f)
        seal_file(tmp)


def save_into(state: dict, f: BinaryIO) -> None:
    """torch.save into an open file; a failed write is the OSError it was (torch's zip writer wraps the
    write error it meets while closing the archive in a RuntimeError)."""
    try:
        torch.save(state, f)
    except RuntimeError as e:
        cause = e.__context__ or e.__cause__
        if isinstance(cause, OSError):
            raise cause from None
        raise OSError(errno.EIO, f"torch.save failed ({torch_reason(e)})") from None


def check_seal(path: Path, f: BinaryIO) -> None:
    """CheckpointError unless the open file ends with a checksum comment that matches all bytes before it."""
    size = os.fstat(f.fileno()).st_size
    head = f.read(4)
    f.seek(max(0, size - COMMENT_BYTES))
    comment = f.read()
    if size < ZIP_END_BYTES + COMMENT_BYTES or not comment.startswith(SEAL):
        f.seek(max(0, size - ZIP_END_BYTES))
        if head == b"PK\x03\x04" and f.read(4) == ZIP_END:
            raise CheckpointError(f"{path}: a zip file without an mdlm-golf checksum (an older mdlm-golf "
                                  f"or another program wrote it); not loaded")
        raise CheckpointError(f"{path}: not an mdlm-golf checkpoint, or truncated (no checksum at its end)")
    if sha256_prefix(f, size - COMMENT_BYTES) != comment[len(SEAL):]:
        raise CheckpointError(f"{path}: checksum mismatch: the file changed after it was written (corrupt)")


def torch_reason(error: Exception) -> str:
    """The line of a torch.load error that says what was wrong (its first lines are boilerplate)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    useful = [line for line in lines if not line.startswith(boilerplate)]
    return (useful or lines or [type(error).__name__])[0]


def load_weights_only(path: Path, f: BinaryIO) -> object:
    """torch.load that unpickles tensors and plain values only: a crafted file cannot run code."""
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a well-sealed but foreign file fails in many torch error types
        raise CheckpointError(f"{path}: refused, not a weights-only checkpoint ({torch_reason(e)}); "
                              f"nothing in it was run") from None


def first_non_finite(tensors: dict) -> str | None:
    """The name of the first floating-point tensor holding a nan or inf, if any."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def read_checkpoint(path: Path) -> dict:
    """The checkpoint dict, after checking its checksum and loading it weights-only."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with open(path, "rb") as f:  # one open file: what is loaded is what was checked, even if replaced
            check_seal(path, f)
            f.seek(0)
            state = load_weights_only(path, f)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({e.strerror})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{path}: not an mdlm-golf checkpoint")
    bad = first_non_finite(state["model"])
    if bad is not None:
        raise CheckpointError(f"{path}: weight {bad} is not finite (nan or inf); not loaded")
    return state


def load_model(path: Path, device: torch.device | str = "cpu") -> tuple[Transformer, Config, dict]:
    """The model, its config and the whole checkpoint dict."""
    state = read_checkpoint(path)
    try:
        cfg = config_from_dict(state["config"], str(path))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad config ({e})") from None
    check_weights_fit(path, cfg, {k: tuple(v.shape) for k, v in state["model"].items()
                                  if isinstance(v, torch.Tensor)}, CheckpointError)
    model = Transformer(cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match its config ({str(e).splitlines()[0]})") from None
    return model.to(device), cfg, state


def check_weights_fit(path: Path, cfg: Config, shapes: dict[str, tuple[int, ...]], error: type[Exception]) -> None:
    """`error` unless the file's tensors are exactly the weights its config's model has, checked on the
    meta device before the model is built: a config that claims a larger model than the file holds
    is refused, not allocated."""
    want = parameter_shapes(cfg)
    if shapes == want:
        return
    name = next(iter(sorted(set(want) ^ set(shapes))), None) or next(k for k in want if want[k] != shapes[k])
    raise error(f"{path}: weights do not match its config ({name}: the file holds "
                f"{shapes.get(name, 'nothing')}, the config needs {want.get(name, 'nothing')})")


def run_checkpoint(run_dir: Path) -> Path:
    """The final checkpoint of a run folder."""
    return Path(run_dir) / "model.pt"
