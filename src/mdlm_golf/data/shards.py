"""The challenge's shard format (a 256-word header, then uint16 tokens), the manifest, and shard sets."""
from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ..files import atomic_path, read_json_object, write_text_atomic

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_WORDS = 256
HEADER_BYTES = HEADER_WORDS * 4
MANIFEST_NAME = "manifest.json"


class DataError(ValueError):
    """Bad input data; the message is one line that names the file."""


# ---------------------------------------------------------------- one shard

def write_shard(path: Path, tokens: np.ndarray) -> None:
    """Write one shard atomically: 256 int32 header words, then uint16 tokens."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(np.uint16).max):
        raise DataError(f"{path}: tokens do not fit in uint16")
    header = np.zeros(HEADER_WORDS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2", copy=False).tobytes())


def read_shard_header(path: Path) -> int:
    """Check a shard's header and size; return its token count."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise DataError(f"{path}: cannot read shard ({e.strerror})") from None
    if len(raw) < HEADER_BYTES:
        raise DataError(f"{path}: truncated header ({len(raw)} of {HEADER_BYTES} bytes)")
    magic, version, count = np.frombuffer(raw, dtype="<i4", count=3)
    if magic != SHARD_MAGIC:
        raise DataError(f"{path}: bad magic {magic} (expected {SHARD_MAGIC}); not a token shard")
    if version != SHARD_VERSION:
        raise DataError(f"{path}: unsupported shard version {version} (expected {SHARD_VERSION})")
    expected = HEADER_BYTES + 2 * int(count)
    if size != expected:
        raise DataError(f"{path}: header declares {count} tokens ({expected} bytes) "
                        f"but the file has {size} bytes")
    return int(count)


def read_shard(path: Path, vocab_size: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Read and validate one shard, optionally straight into a pre-allocated uint16 buffer."""
    count = read_shard_header(path)
    if out is None:
        out = np.empty(count, dtype=np.uint16)
    elif out.size != count:
        raise DataError(f"{path}: buffer holds {out.size} tokens, shard has {count}")
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        if f.readinto(memoryview(out).cast("B")) != 2 * count:
            raise DataError(f"{path}: file shrank while reading")
    if vocab_size is not None and count and int(out.max()) >= vocab_size:
        bad = int(np.argmax(out >= vocab_size))
        raise DataError(f"{path}: token {int(out[bad])} at position {bad} is >= vocab size {vocab_size}")
    return out


# ---------------------------------------------------------------- manifest and splits

def read_manifest(data_dir: Path) -> dict | None:
    """DIR/manifest.json (written by prepare), or None where there is none; bad JSON is a one-line error."""
    return read_json_object(Path(data_dir) / MANIFEST_NAME, DataError, "a JSON manifest")


def write_manifest(data_dir: Path, manifest: dict) -> None:
    """Write DIR/manifest.json atomically (last, so a folder with a manifest has all its shards)."""
    write_text_atomic(Path(data_dir) / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")


def shard_paths(data_dir: Path, split: str) -> list[Path]:
    """The split's shards in order: those DIR/manifest.json lists, so stray old shards are never read;
    without a manifest (the challenge's downloaded layout) every fineweb_{split}_*.bin, sorted."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    if manifest is not None:
        return _listed_shards(manifest, data_dir, split)
    paths = sorted(data_dir.glob(f"fineweb_{split}_*.bin"))
    if not paths:
        raise DataError(f"{data_dir}: no fineweb_{split}_*.bin shards found")
    return paths


def _listed_shards(manifest: dict, data_dir: Path, split: str) -> list[Path]:
    """The manifest's split -> shards list as paths in DIR; a missing or malformed entry names the file."""
    where = Path(data_dir) / MANIFEST_NAME
    entry = manifest.get(split)
    names = entry.get("shards") if isinstance(entry, dict) else None
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise DataError(f"{where}: no list of {split} shards (expected \"{split}\": {{\"shards\": [...]}})")
    if any(Path(n).name != n or n in (".", "..") for n in names):  # a shard lives in DIR itself
        raise DataError(f"{where}: {split} shard names must be plain file names, got {names[:3]}")
    paths = [Path(data_dir) / n for n in names]
    missing = next((p for p in paths if not p.exists()), None)
    if missing is not None:
        raise DataError(f"{missing}: listed in {where} but missing")
    return paths


def load_split(data_dir: Path, split: str, vocab_size: int) -> np.ndarray:
    """All tokens of a split, concatenated into one pre-sized array (no 2x peak)."""
    paths = shard_paths(data_dir, split)
    counts = [read_shard_header(p) for p in paths]
    if not sum(counts):
        raise DataError(f"{paths[0] if len(paths) == 1 else data_dir}: the {split} split holds no tokens")
    check_manifest_tokens(data_dir, split, sum(counts))
    tokens = np.empty(sum(counts), dtype=np.uint16)
    offset = 0
    for path, count in zip(paths, counts):
        read_shard(path, vocab_size, out=tokens[offset:offset + count])
        offset += count
    return tokens


def check_manifest_tokens(data_dir: Path, split: str, tokens: int) -> None:
    """The split's shard headers must add up to the token count the manifest recorded (where it has one):
    a shard swapped or rewritten after prepare would otherwise be scored silently."""
    manifest = read_manifest(data_dir) or {}
    recorded = manifest.get(split, {}).get("tokens") if isinstance(manifest.get(split), dict) else None
    if isinstance(recorded, int) and recorded != tokens:
        raise DataError(f"{Path(data_dir) / MANIFEST_NAME}: records {recorded:,} {split} tokens but its "
                        f"shards hold {tokens:,}; the folder changed after prepare (prepare it again)")


def resolve_shards(shards: str | Path | Sequence[str | Path]) -> tuple[list[Path], str]:
    """Shard paths from a glob pattern, a single file or a list; and a name for error messages."""
    if isinstance(shards, (str, Path)):
        text = str(shards)
        if glob.has_magic(text):
            paths = [Path(p) for p in sorted(glob.glob(text))]
            if not paths:
                raise DataError(f"{text}: no shard files match this pattern")
            return paths, text
        path = Path(text)
        if path.is_dir():
            raise DataError(f"{path}: is a directory; pass a glob such as {path}/fineweb_train_*.bin")
        return [path], text
    paths = [Path(p) for p in shards]
    if not paths:
        raise DataError("no shard files given (empty list)")
    return paths, f"{paths[0].parent}/{{{len(paths)} shards}}"
