"""The artifact file: bit-packed tensor bytes, one compressed payload, a CRC-32 over every byte; loading it.

File layout: MAGIC (8 bytes) | version (u16) | metadata length (u32) | metadata JSON | payload | CRC-32
(u32) of every byte before it, so a changed byte in the header, the metadata or the payload is refused.
The payload is every tensor's bytes in metadata order, compressed once: per-row codes (offset to
unsigned; sub-byte formats bit-packed or one code per byte, whichever compresses smaller) followed
by one fp16 scale per row, or raw fp16 values.
"""
from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import check_weights_fit, first_non_finite
from ..config import Config, config_from_dict
from ..model import Transformer
from .compress import compress, decompress_bounded
from .quant import FORMAT_BITS, SMALL_NUMEL, QuantTensor, dequantize_state_dict, parse_spec

MAGIC = b"MDLMGOLF"
VERSION = 2  # 2: the CRC covers header, metadata and payload (1: payload only)
HEADER = struct.Struct("<8sHI")  # magic, version, metadata bytes
CHECKSUM = struct.Struct("<I")  # CRC-32 of all bytes before it: 4 bytes, and any 1-byte change is caught
META_KEYS = ("config", "compressor", "packed", "payload_bytes", "tensors")
# the most a payload may expand: real exports compress their codes 1-2x (zero tensors more, but they are
# a small share), so a file whose table claims more is crafted or corrupt and is refused before allocating
MAX_EXPANSION = 64


class ArtifactError(ValueError):
    """An artifact file that cannot be used; the message is one line naming the file."""


# ---------------------------------------------------------------- bit-packing

def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes < 2**bits densely, little-endian: int6 -> 4 per 3 bytes, int4 -> 2 per byte."""
    codes = np.asarray(codes, dtype=np.uint8).ravel()
    if codes.size and int(codes.max()) >> bits:
        raise ValueError(f"codes do not fit in {bits} bits (max {int(codes.max())})")
    per_group = 8 // math.gcd(bits, 8)  # values per whole number of bytes
    group_bytes = bits * per_group // 8
    padded = np.zeros(-(-codes.size // per_group) * per_group, dtype=np.uint64)
    padded[: codes.size] = codes
    shifts = (np.arange(per_group, dtype=np.uint64) * np.uint64(bits))
    words = np.bitwise_or.reduce(padded.reshape(-1, per_group) << shifts, axis=1)
    out = (words[:, None] >> (np.arange(group_bytes, dtype=np.uint64) * np.uint64(8))) & np.uint64(0xFF)
    return out.astype(np.uint8).ravel()


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of pack_bits: the first `count` codes as uint8."""
    per_group = 8 // math.gcd(bits, 8)
    group_bytes = bits * per_group // 8
    groups = np.asarray(packed, dtype=np.uint8).reshape(-1, group_bytes).astype(np.uint64)
    words = np.bitwise_or.reduce(groups << (np.arange(group_bytes, dtype=np.uint64) * np.uint64(8)), axis=1)
    shifts = np.arange(per_group, dtype=np.uint64) * np.uint64(bits)
    codes = (words[:, None] >> shifts) & np.uint64((1 << bits) - 1)
    return codes.astype(np.uint8).ravel()[:count]


def packed_size(count: int, bits: int, packed: bool) -> int:
    """Bytes of `count` codes: bit-packed in whole groups, or one per byte."""
    if not packed or bits == 8:
        return count
    per_group = 8 // math.gcd(bits, 8)
    return -(-count // per_group) * (bits * per_group // 8)


def layout_name(packed: bool) -> str:
    """How sub-byte codes are laid out in the payload."""
    return "packed" if packed else "bytes"


# ---------------------------------------------------------------- tensor bytes

def stored_count(entry: dict) -> int:
    """Values a metadata entry stores (trimmed rows excluded)."""
    return entry["rows"] * math.prod(entry["shape"][1:]) if entry["shape"] else 1


def entry_bytes(entry: dict, packed: bool) -> int:
    """Payload bytes of one metadata entry: codes + fp16 scales, or fp16 values."""
    if entry["format"] == "fp16":
        return 2 * stored_count(entry)
    return packed_size(stored_count(entry), FORMAT_BITS[entry["format"]], packed) + 2 * entry["rows"]


def tensor_bytes(qt: QuantTensor, packed: bool) -> bytes:
    """One tensor's payload bytes: codes then fp16 scales, or fp16 values."""
    if qt.scale is None:
        return qt.data.astype("<f2").tobytes()
    bits = FORMAT_BITS[qt.format]
    codes = pack_bits(qt.data, bits) if packed and bits < 8 else qt.data.ravel()
    return codes.tobytes() + qt.scale.astype("<f2").tobytes()


def tensor_from_bytes(entry: dict, raw: bytes, packed: bool) -> QuantTensor:
    """Inverse of tensor_bytes, shaped by its metadata entry."""
    count, rows = stored_count(entry), entry["rows"]
    stored_shape = (rows, *entry["shape"][1:]) if entry["shape"] else ()
    base = dict(name=entry["name"], group=entry["group"], format=entry["format"],
                shape=tuple(entry["shape"]), dtype=entry["dtype"])
    if entry["format"] == "fp16":
        return QuantTensor(data=np.frombuffer(raw, dtype="<f2").reshape(stored_shape).astype(np.float16), **base)
    bits = FORMAT_BITS[entry["format"]]
    codes_end = packed_size(count, bits, packed)
    codes = np.frombuffer(raw[:codes_end], dtype=np.uint8)
    codes = unpack_bits(codes, bits, count) if packed and bits < 8 else codes.copy()
    scale = np.frombuffer(raw[codes_end:], dtype="<f2").astype(np.float16)
    return QuantTensor(data=codes.reshape(stored_shape), scale=scale, **base)


# ---------------------------------------------------------------- writing

def encode_artifact(qtensors: list[QuantTensor], cfg: Config, spec: str, *, compressor: str = "lzma",
                    packed: bool | None = None, method: str = "rtn", small_numel: int = SMALL_NUMEL,
                    extra: dict | None = None) -> tuple[bytes, dict]:
    """The artifact's bytes and metadata ('compressed_sizes': every compressor and layout tried).

    packed=None tries both layouts of sub-byte codes: bit-packed, and one code per byte, which
    entropy-coding compressors (lzma, zstd, brotli) often shrink further than the packed bits.
    """
    sub_byte = any(qt.scale is not None and FORMAT_BITS[qt.format] < 8 for qt in qtensors)
    layouts = [packed] if packed is not None else ([True, False] if sub_byte else [False])
    tried, best = {}, None
    for layout in layouts:
        raw = b"".join(tensor_bytes(qt, layout) for qt in qtensors)
        name, blob, sizes = compress(raw, compressor)
        tried.update({f"{n}/{layout_name(layout)}": size for n, size in sizes.items()})
        if best is None or len(blob) < len(best[2]):
            best = (layout, name, blob, len(raw))
    layout, name, blob, raw_bytes = best
    meta = {"format": "mdlm-golf-artifact", "version": VERSION, "config": cfg.to_dict(), "spec": spec,
            "groups": parse_spec(spec), "method": method, "small_numel": small_numel, "packed": layout,
            "compressor": name, "raw_bytes": raw_bytes, "payload_bytes": len(blob),
            **(extra or {}), "tensors": [qt.entry() for qt in qtensors]}
    meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
    data = seal_artifact(HEADER.pack(MAGIC, VERSION, len(meta_bytes)) + meta_bytes + blob)
    return data, {**meta, "compressed_sizes": tried}


def seal_artifact(body: bytes) -> bytes:
    """Header + metadata + payload, followed by their CRC-32."""
    return body + CHECKSUM.pack(zlib.crc32(body))


# ---------------------------------------------------------------- reading

def read_meta(path: Path, data: bytes) -> tuple[dict, bytes]:
    """Check the header, metadata and checksum; returns (metadata, compressed payload)."""
    if len(data) < HEADER.size:
        raise ArtifactError(f"{path}: {len(data)} bytes is too short for an mdlm-golf artifact")
    magic, version, meta_len = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ArtifactError(f"{path}: not an mdlm-golf artifact (bad magic {magic!r})")
    if version != VERSION:
        raise ArtifactError(f"{path}: unsupported artifact version {version} (expected {VERSION}; "
                            f"export it again from its checkpoint)")
    if HEADER.size + meta_len > len(data):
        raise ArtifactError(f"{path}: truncated metadata ({len(data) - HEADER.size} of {meta_len} bytes)")
    try:
        meta = json.loads(data[HEADER.size:HEADER.size + meta_len])
        missing = [k for k in META_KEYS if k not in meta]
    except (ValueError, TypeError):
        raise ArtifactError(f"{path}: corrupt artifact metadata") from None
    if missing:
        raise ArtifactError(f"{path}: corrupt artifact metadata (missing {', '.join(missing)})")
    # lengths first, so a cut file says "truncated" rather than only failing the checksum
    body_end = max(HEADER.size + meta_len, len(data) - CHECKSUM.size)
    payload, expected = data[HEADER.size + meta_len:body_end], meta["payload_bytes"]
    if len(payload) != expected:
        raise ArtifactError(f"{path}: truncated payload ({len(payload)} of {expected} bytes)")
    if len(data) - body_end != CHECKSUM.size:
        raise ArtifactError(f"{path}: truncated file (no checksum after the payload)")
    if zlib.crc32(data[:body_end]) != CHECKSUM.unpack_from(data, body_end)[0]:
        raise ArtifactError(f"{path}: checksum mismatch (CRC-32 over header, metadata and payload): corrupt file")
    return meta, payload


def read_artifact(path: Path) -> tuple[dict, list[QuantTensor]]:
    """The metadata and quantized tensors of an artifact file. Every size it states is checked before
    anything is allocated: the config's ranges, the tensor table against the config's model (on the meta
    device), and the tensors' bytes against the payload (at most MAX_EXPANSION times its size)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read artifact ({e.strerror})") from None
    meta, payload = read_meta(path, data)
    sizes = checked_table(path, meta)
    if sum(sizes) > MAX_EXPANSION * len(payload):
        raise ArtifactError(f"{path}: its tensors claim {sum(sizes):,} bytes from a {len(payload):,}-byte "
                            f"payload (more than {MAX_EXPANSION}x): not an artifact export wrote")
    try:
        raw = decompress_bounded(meta["compressor"], payload, sum(sizes))
    except ValueError as e:  # an unknown or uninstalled compressor
        raise ArtifactError(f"{path}: {e}") from None
    except Exception as e:  # each library raises its own error type for a corrupt stream
        raise ArtifactError(f"{path}: cannot decompress the {meta['compressor']} payload ({e})") from None
    if sum(sizes) != len(raw):
        raise ArtifactError(f"{path}: payload holds {len(raw)}{'+' if len(raw) > sum(sizes) else ''} bytes, "
                            f"its tensors need {sum(sizes)}")
    offsets = np.cumsum([0, *sizes]).tolist()
    try:
        qtensors = [tensor_from_bytes(e, raw[a:b], meta["packed"])
                    for e, a, b in zip(meta["tensors"], offsets, offsets[1:])]
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{path}: corrupt tensor table ({e!r})") from None
    return meta, qtensors


def checked_table(path: Path, meta: dict) -> list[int]:
    """The payload bytes of every tensor entry, once the config is in range and the table lists exactly
    its model's weights with their shapes (each entry's stored rows at most its shape's)."""
    cfg = artifact_config(path, meta)
    try:
        entries = {e["name"]: e for e in meta["tensors"]}
        check_weights_fit(path, cfg, {name: tuple(e["shape"]) for name, e in entries.items()}, ArtifactError)
        if any(not 0 <= e["rows"] <= max(1, (e["shape"] or [1])[0]) for e in entries.values()):
            raise ValueError("stored rows outside a tensor's shape")
        return [entry_bytes(e, meta["packed"]) for e in meta["tensors"]]
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ArtifactError):
            raise
        raise ArtifactError(f"{path}: corrupt tensor table ({e!r})") from None


def artifact_config(path: Path, meta: dict) -> Config:
    """The artifact's config, range-checked as a flag would be."""
    try:
        return config_from_dict(meta["config"], str(path))
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{path}: bad config ({e})") from None


def load_artifact(path: Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, Config, dict]:
    """A model with the artifact's dequantized float32 weights, its config and metadata."""
    meta, qtensors = read_artifact(path)
    cfg = artifact_config(path, meta)
    state = dequantize_state_dict(qtensors)
    bad = first_non_finite(state)
    if bad is not None:
        raise ArtifactError(f"{path}: weight {bad} is not finite (nan or inf); not loaded")
    model = Transformer(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ArtifactError(f"{path}: weights do not match its config ({str(e).splitlines()[0]})") from None
    return model.to(device), cfg, meta
