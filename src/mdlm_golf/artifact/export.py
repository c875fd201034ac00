"""The 16 MB artifact: post-training quantization, bit-packing, compression, the file, size accounting.

A parameter-golf entry is judged on code bytes + compressed weights <= 16,000,000 bytes and is
scored after decompression, so the artifact is what gets evaluated (`load_artifact`).

File layout: MAGIC (8 bytes) | version (u16) | metadata length (u32) | metadata JSON | payload | CRC-32
(u32) of every byte before it, so a changed byte in the header, the metadata or the payload is refused.
The payload is every tensor's bytes in metadata order, compressed once: per-row codes (offset to
unsigned; sub-byte formats bit-packed or one code per byte, whichever compresses smaller) followed
by one fp16 scale per row, or raw fp16 values.
"""
from __future__ import annotations

import json
import lzma
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from ..checkpoint import first_non_finite
from ..config import Config, config_from_dict
from ..files import write_bytes_atomic

MAGIC = b"MDLMGOLF"
VERSION = 2  # 2: the CRC covers header, metadata and payload (1: payload only)
HEADER = struct.Struct("<8sHI")  # magic, version, metadata bytes
CHECKSUM = struct.Struct("<I")  # CRC-32 of all bytes before it: 4 bytes, and any 1-byte change is caught
LIMIT_BYTES = 16_000_000  # decimal: the challenge's cap on code + compressed weights

FORMAT_BITS = {"int8": 8, "int6": 6, "int5": 5, "int4": 4, "fp16": 16}
GROUPS = ("embed", "attn", "mlp", "head", "adaln")
# `export --quant auto` candidates, most precise first. Each step lowers some groups and raises none, so
# every model's size falls step by step; embed and head (few params, most sensitive) stay high longest.
AUTO_SPECS = (
    "int8",
    "embed=int8,head=int8,attn=int6,mlp=int6,adaln=int8",
    "embed=int8,head=int8,attn=int6,mlp=int6,adaln=int6",
    "embed=int8,head=int8,attn=int6,mlp=int5,adaln=int6",
    "embed=int8,head=int8,attn=int5,mlp=int5,adaln=int5",
    "embed=int8,head=int8,attn=int5,mlp=int4,adaln=int5",
    "embed=int6,head=int6,attn=int5,mlp=int4,adaln=int5",
    "embed=int6,head=int6,attn=int5,mlp=int4,adaln=int4",
    "embed=int6,head=int6,attn=int4,mlp=int4,adaln=int4",
    "int4",
)
AUTO_MIN_MARGIN = 100_000  # bytes auto leaves spare under the limit
COMPRESSORS = ("zlib", "lzma", "zstd", "brotli")
METHODS = ("rtn", "gptq")
# Tensors under this many values stay fp16: their scales would cost more than they save
# (the challenge's baseline keeps float tensors <= 65,536 values).
SMALL_NUMEL = 65_536
CLIP_FRACTIONS = tuple(1.0 - 0.025 * k for k in range(21))  # 1.0 first: ties keep the unclipped row
FP16_TINY = 2.0 ** -24  # smallest positive fp16: a scale never underflows to 0


class ArtifactError(ValueError):
    """An artifact file that cannot be used; the message is one line naming the file."""


class OversizeError(ValueError):
    """Code + artifact would exceed the byte limit; `report` holds the size report that says by how much."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


# ---------------------------------------------------------------- spec: which format for which tensor

def param_group(name: str) -> str:
    """The quantization group of an MDLM state-dict entry."""
    if name == "embed.weight":
        return "embed"
    if name == "head.weight":
        return "head"
    if name.startswith(("final_adaln.", "noise.", "final_modulation")):
        return "adaln"
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "blocks" and parts[2] in ("attn", "mlp", "adaln", "modulation"):
        return "adaln" if parts[2] == "modulation" else parts[2]
    # an unmapped parameter would silently get some format; make whoever adds one choose
    raise ValueError(f"parameter {name!r} belongs to no quantization group; add it to artifact.param_group")


def parse_spec(spec: str) -> dict[str, str]:
    """'int8' or 'embed=int8,attn=int6,...' -> {group: format}; a bare format sets unnamed groups."""
    default, groups = None, {}
    for item in (s.strip() for s in spec.split(",")):
        name, _, fmt = item.rpartition("=")
        if fmt not in FORMAT_BITS:
            raise ValueError(f"quant spec {spec!r}: unknown format {fmt!r} (choose from {', '.join(FORMAT_BITS)})")
        if not name and "=" in item:
            raise ValueError(f"quant spec {spec!r}: empty group name in {item!r}")
        if not name:
            if default is not None:
                raise ValueError(f"quant spec {spec!r}: more than one default format")
            default = fmt
        elif name not in GROUPS:
            raise ValueError(f"quant spec {spec!r}: unknown group {name!r} (choose from {', '.join(GROUPS)})")
        elif name in groups:
            raise ValueError(f"quant spec {spec!r}: group {name!r} given twice")
        else:
            groups[name] = fmt
    missing = [g for g in GROUPS if g not in groups]
    if missing and default is None:
        raise ValueError(f"quant spec {spec!r}: no format for {', '.join(missing)} (add a default like 'int8,...')")
    return {g: groups.get(g, default) for g in GROUPS}


def trimmed_rows(cfg: Config) -> dict[str, int]:
    """Rows that matter in padded tensors: ids >= num_real_rows are never embedded nor scored."""
    return {"embed.weight": cfg.num_real_rows, "head.weight": cfg.num_real_rows}


# ---------------------------------------------------------------- per-row symmetric quantization

def qmax(bits: int) -> int:
    """Largest code magnitude: symmetric codes in [-qmax, qmax] (int6: 31)."""
    return 2 ** (bits - 1) - 1


def fp16_scale(value: torch.Tensor) -> torch.Tensor:
    """Round scales to what the file stores (fp16), kept away from 0 so division stays finite."""
    return value.to(torch.float16).float().clamp(min=FP16_TINY)


def quantize_rows(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed integer codes of w [R, C] for per-row scales [R] (round to nearest, clamp)."""
    limit = qmax(bits)
    return torch.clamp(torch.round(w / scale[:, None]), -limit, limit)


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float32 weights from integer codes [R, C] and per-row scales [R]."""
    return codes.float() * scale.float()[:, None]


def row_errors(w: torch.Tensor, scale: torch.Tensor, bits: int, buf: torch.Tensor | None = None) -> torch.Tensor:
    """Squared reconstruction error of each row [R]; in place in `buf` (memory-bound, so it pays)."""
    limit, s = qmax(bits), scale[:, None]
    buf = torch.div(w, s, out=buf)
    buf.round_().clamp_(-limit, limit).mul_(s).sub_(w)
    return torch.linalg.vector_norm(buf, dim=1).square_()


def clip_search(w: torch.Tensor, bits: int, fractions: Iterable[float] = CLIP_FRACTIONS) -> torch.Tensor:
    """Per-row fp16 scales [R] whose clip fraction of the row's max |w| minimizes squared error."""
    w = w.float()
    max_abs = w.abs().amax(dim=1)
    best_scale = torch.zeros_like(max_abs)
    best_err = torch.full_like(max_abs, math.inf)
    buf = torch.empty_like(w)
    for fraction in fractions:  # a few candidates, each vectorized over all rows
        scale = fp16_scale(max_abs * fraction / qmax(bits))
        err = row_errors(w, scale, bits, buf)
        better = err < best_err
        best_scale = torch.where(better, scale, best_scale)
        best_err = torch.where(better, err, best_err)
    return best_scale


# ---------------------------------------------------------------- GPTQ: error-compensated rounding

def gptq_codes(w: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, bits: int,
               block: int = 128, damp: float = 0.01) -> torch.Tensor:
    """GPTQ (Frantar et al. 2022): quantize columns in turn, pushing each one's error onto the rest."""
    w = w.double().clone()
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0  # inputs never seen in calibration: their weights cannot matter there
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = torch.argsort(torch.diagonal(h), descending=True)  # "act order": big inputs first
    w, h = w[:, order], h[order][:, order]
    hinv = damped_inverse_cholesky(h, damp)
    scale = scale.double()
    limit = qmax(bits)
    codes = torch.zeros_like(w)
    for start in range(0, w.size(1), block):
        end = min(start + block, w.size(1))
        wb, errs, hb = w[:, start:end].clone(), torch.zeros_like(w[:, start:end]), hinv[start:end, start:end]
        for i in range(end - start):  # columns in turn; each step is vectorized over all rows
            q = torch.clamp(torch.round(wb[:, i] / scale), -limit, limit)
            codes[:, start + i] = q
            err = (wb[:, i] - q * scale) / hb[i, i]
            wb[:, i:] -= err[:, None] * hb[i, i:][None, :]
            errs[:, i] = err
        w[:, end:] -= errs @ hinv[start:end, end:]
    return codes[:, torch.argsort(order)].float()


def damped_inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1, damping more until H is positive definite."""
    for attempt in range(4):
        damped = h + torch.eye(h.size(0), dtype=h.dtype) * (damp * 10 ** attempt * torch.diagonal(h).mean())
        try:
            return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise ValueError(f"GPTQ: Hessian not positive definite even with damping {damp * 1000:g}")


@torch.no_grad()
def collect_hessians(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                     ) -> dict[str, torch.Tensor]:
    """H = X^T X of every Linear's input over calibration batches of (x_t, sigma), keyed 'NAME.weight'."""
    hessians: dict[str, torch.Tensor] = {}
    hooks = []

    def hook_for(name: str) -> Callable:
        def hook(module, inputs, output) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].size(-1)).double()
            hessians[name] = hessians.get(name, 0) + x.T @ x
        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            hooks.append(module.register_forward_hook(hook_for(f"{name}.weight")))
    try:
        for x_t, sig in batches:
            model(x_t, sig)
    finally:
        for h in hooks:
            h.remove()
    return {name: h.cpu() for name, h in hessians.items()}


def calibration_batches(cfg: Config, tokens: np.ndarray, num_batches: int, rows: int,
                        seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Masked (x_t, sigma) batches from contiguous windows of train tokens, t ~ U(0, 1) per row."""
    from ..diffusion import alpha, sigma

    generator = torch.Generator().manual_seed(seed)
    windows = tokens.size // cfg.seq_len
    if windows < 1:
        raise ValueError(f"calibration needs at least {cfg.seq_len} tokens, got {tokens.size}")
    batches = []
    for _ in range(num_batches):
        starts = torch.randint(windows, (rows,), generator=generator) * cfg.seq_len
        x0 = torch.from_numpy(np.stack([tokens[s:s + cfg.seq_len] for s in starts.tolist()]).astype(np.int64))
        t = torch.rand(rows, generator=generator)
        masked = torch.rand(x0.shape, generator=generator) < (1.0 - alpha(t, cfg.noise_eps))[:, None]
        batches.append((torch.where(masked, torch.full_like(x0, cfg.mask_id), x0), sigma(t, cfg.noise_eps)))
    return batches


# ---------------------------------------------------------------- quantized tensors

@dataclass
class QuantTensor:
    """One state-dict entry as stored: fp16 values, or unsigned codes [rows, C] with fp16 row scales."""

    name: str
    group: str
    format: str
    shape: tuple[int, ...]
    dtype: str
    data: np.ndarray  # float16 values, or uint8 codes offset by qmax + 1
    scale: np.ndarray | None = None  # float16 [rows]

    @property
    def rows(self) -> int:
        return self.data.shape[0] if self.data.ndim else 1

    def entry(self) -> dict:
        return {"name": self.name, "group": self.group, "format": self.format, "shape": list(self.shape),
                "dtype": self.dtype, "rows": self.rows, "scale": None if self.scale is None else "fp16/row"}


def tensor_format(name: str, tensor: torch.Tensor, groups: dict[str, str], small_numel: int) -> str:
    """Its group's format for a large matrix; fp16 for vectors, scalars and small tensors."""
    if tensor.dim() != 2 or tensor.numel() < small_numel:
        return "fp16"
    return groups[param_group(name)]


def quantize_tensor(name: str, tensor: torch.Tensor, fmt: str, rows: int | None = None,
                    hessian: torch.Tensor | None = None) -> QuantTensor:
    """Quantize one entry (keeping its first `rows` rows); a Hessian switches rounding to GPTQ."""
    if not tensor.is_floating_point():
        raise ValueError(f"parameter {name!r}: cannot quantize a {tensor.dtype} tensor")
    w = tensor.detach().float().cpu()
    if not torch.isfinite(w).all():
        raise ValueError(f"parameter {name!r} holds NaN or inf values")
    w = w[:rows] if rows is not None else w
    base = dict(name=name, group=param_group(name), format=fmt, shape=tuple(tensor.shape),
                dtype=str(tensor.dtype).removeprefix("torch."))
    if fmt == "fp16":
        if w.numel() and w.abs().max() > torch.finfo(torch.float16).max:
            raise ValueError(f"parameter {name!r} overflows fp16")
        return QuantTensor(data=w.to(torch.float16).numpy(), **base)
    bits = FORMAT_BITS[fmt]
    if w.numel() and w.abs().max() / qmax(bits) > torch.finfo(torch.float16).max:
        raise ValueError(f"parameter {name!r}: a row scale would overflow fp16")
    scale = clip_search(w, bits)
    codes = quantize_rows(w, scale, bits) if hessian is None else gptq_codes(w, hessian, scale, bits)
    return QuantTensor(data=(codes + qmax(bits) + 1).to(torch.uint8).numpy(),
                       scale=scale.to(torch.float16).numpy(), **base)


def dequantize_tensor(qt: QuantTensor) -> torch.Tensor:
    """The float32 tensor of the full shape (trimmed rows come back as zeros)."""
    if qt.scale is None:
        values = torch.from_numpy(qt.data.astype(np.float32))
    else:
        codes = torch.from_numpy(qt.data.astype(np.int16) - (qmax(FORMAT_BITS[qt.format]) + 1))
        values = dequantize_rows(codes, torch.from_numpy(qt.scale.astype(np.float32)))
    full = torch.zeros(qt.shape, dtype=torch.float32)
    if full.dim():
        full[: qt.rows] = values.reshape(qt.rows, *qt.shape[1:])
    else:
        full.fill_(values.item())
    return full


def quantize_state_dict(state: dict[str, torch.Tensor], cfg: Config, spec: str, *,
                        small_numel: int = SMALL_NUMEL,
                        hessians: dict[str, torch.Tensor] | None = None) -> list[QuantTensor]:
    """Every state-dict entry in its group's format (GPTQ where a Hessian is given, else RTN)."""
    groups = parse_spec(spec)
    rows = trimmed_rows(cfg)
    hessians = hessians or {}
    return [quantize_tensor(name, t, tensor_format(name, t, groups, small_numel), rows.get(name),
                            hessians.get(name)) for name, t in state.items()]


def dequantize_state_dict(qtensors: list[QuantTensor]) -> dict[str, torch.Tensor]:
    """The float32 state dict the artifact loads as."""
    return {qt.name: dequantize_tensor(qt) for qt in qtensors}


def quantize_model(model: torch.nn.Module, spec: str, *, method: str = "rtn", small_numel: int = SMALL_NUMEL,
                   calibration: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> list[QuantTensor]:
    """An MDLM's weights quantized by `method`: rtn (clip search + rounding) or gptq (needs calibration)."""
    if method not in METHODS:
        raise ValueError(f"quantization method must be one of {METHODS}, got {method!r}")
    hessians = None
    if method == "gptq":
        if not calibration:
            raise ValueError("method 'gptq' needs calibration batches")
        hessians = collect_hessians(model, calibration)
    return quantize_state_dict(model.state_dict(), model.cfg, spec, small_numel=small_numel, hessians=hessians)


def roundtrip_model(model: torch.nn.Module, qtensors: list[QuantTensor]) -> torch.nn.Module:
    """A copy of the model carrying the dequantized weights (what the artifact will load as)."""
    from ..model import MDLM

    copy = MDLM(model.cfg)
    copy.load_state_dict(dequantize_state_dict(qtensors))
    return copy.to(next(model.parameters()).device)


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


# ---------------------------------------------------------------- payload

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
    code_bytes_ = packed_size(count, bits, packed)
    codes = np.frombuffer(raw[:code_bytes_], dtype=np.uint8)
    codes = unpack_bits(codes, bits, count) if packed and bits < 8 else codes.copy()
    scale = np.frombuffer(raw[code_bytes_:], dtype="<f2").astype(np.float16)
    return QuantTensor(data=codes.reshape(stored_shape), scale=scale, **base)


# ---------------------------------------------------------------- compression

def compressor_functions(name: str) -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
    """(compress, decompress) at each library's strongest setting; optional libraries imported here."""
    if name == "zlib":
        return (lambda b: zlib.compress(b, 9)), zlib.decompress
    if name == "lzma":
        return (lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME, check=lzma.CHECK_NONE),
                lzma.decompress)
    if name == "zstd":
        try:
            import zstandard
        except ImportError:
            raise ValueError("compressor 'zstd' needs the zstandard package "
                             "(pip install zstandard, or mdlm-golf[compress])") from None
        return (lambda b: zstandard.ZstdCompressor(level=22).compress(b),
                lambda b: zstandard.ZstdDecompressor().decompress(b))
    if name == "brotli":
        try:
            import brotli
        except ImportError:
            raise ValueError("compressor 'brotli' needs the brotli package "
                             "(pip install brotli, or mdlm-golf[compress])") from None
        return (lambda b: brotli.compress(b, quality=11, lgwin=24)), brotli.decompress
    raise ValueError(f"unknown compressor {name!r} (choose from {', '.join(COMPRESSORS)} or 'best')")


def available_compressors() -> list[str]:
    """The compressors whose libraries are installed (zlib and lzma always are)."""
    available = []
    for name in COMPRESSORS:
        try:
            compressor_functions(name)
        except ValueError:
            continue
        available.append(name)
    return available


def compress(raw: bytes, compressor: str) -> tuple[str, bytes, dict[str, int]]:
    """(name, blob, sizes tried); 'best' tries every available compressor and keeps the smallest."""
    names = available_compressors() if compressor == "best" else [compressor]
    blobs = {name: compressor_functions(name)[0](raw) for name in names}
    best = min(blobs, key=lambda n: len(blobs[n]))
    return best, blobs[best], {n: len(b) for n, b in blobs.items()}


# ---------------------------------------------------------------- the file

def layout_name(packed: bool) -> str:
    """How sub-byte codes are laid out in the payload."""
    return "packed" if packed else "bytes"


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


META_KEYS = ("config", "compressor", "packed", "payload_bytes", "tensors")


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
    """The metadata and quantized tensors of an artifact file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read artifact ({e.strerror})") from None
    meta, payload = read_meta(path, data)
    try:
        raw = compressor_functions(meta["compressor"])[1](payload)
    except ValueError as e:  # an unknown or uninstalled compressor
        raise ArtifactError(f"{path}: {e}") from None
    except Exception as e:  # each library raises its own error type for a corrupt stream
        raise ArtifactError(f"{path}: cannot decompress the {meta['compressor']} payload ({e})") from None
    try:
        sizes = [entry_bytes(e, meta["packed"]) for e in meta["tensors"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{path}: corrupt tensor table ({e!r})") from None
    if sum(sizes) != len(raw):
        raise ArtifactError(f"{path}: payload holds {len(raw)} bytes, its tensors need {sum(sizes)}")
    offsets = np.cumsum([0, *sizes]).tolist()
    try:
        qtensors = [tensor_from_bytes(e, raw[a:b], meta["packed"])
                    for e, a, b in zip(meta["tensors"], offsets, offsets[1:])]
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{path}: corrupt tensor table ({e!r})") from None
    return meta, qtensors


def load_artifact(path: Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, Config, dict]:
    """An MDLM with the artifact's dequantized float32 weights, its config and metadata."""
    from ..model import MDLM

    meta, qtensors = read_artifact(path)
    try:
        cfg = config_from_dict(meta["config"], str(path))
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{path}: bad config ({e})") from None
    state = dequantize_state_dict(qtensors)
    bad = first_non_finite(state)
    if bad is not None:
        raise ArtifactError(f"{path}: weight {bad} is not finite (nan or inf); not loaded")
    model = MDLM(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ArtifactError(f"{path}: weights do not match its config ({str(e).splitlines()[0]})") from None
    return model.to(device), cfg, meta


# ---------------------------------------------------------------- size accounting

def package_code_paths() -> list[Path]:
    """The code that ships for now: the package's own modules."""
    return sorted(Path(__file__).resolve().parent.parent.rglob("*.py"))


def code_bytes(paths: Iterable[Path]) -> int:
    """Bytes of the code that ships (a later single-file export passes its one file)."""
    return sum(Path(p).stat().st_size for p in paths)


def group_table(qtensors: list[QuantTensor], packed: bool, compressor: str | None) -> list[dict]:
    """Per group: params, fp32 bytes, bytes before compression, and (if asked) compressed on its own."""
    rows = []
    for group in GROUPS:
        members = [qt for qt in qtensors if qt.group == group]
        raw = b"".join(tensor_bytes(qt, packed) for qt in members)
        row = {"group": group, "tensors": len(members),
               "formats": sorted({qt.format for qt in members}),
               "params": sum(math.prod(qt.shape) for qt in members),
               "fp32_bytes": 4 * sum(math.prod(qt.shape) for qt in members), "quant_bytes": len(raw)}
        if compressor is not None:
            row["compressed_bytes"] = len(compressor_functions(compressor)[0](raw)) if raw else 0
        rows.append(row)
    return rows


def size_report(qtensors: list[QuantTensor], meta: dict, artifact_bytes: int, *,
                code_paths: Iterable[Path] | None = None, limit: int = LIMIT_BYTES,
                attribute: bool = True) -> dict:
    """Everything the 16 MB rule needs: per-group table, artifact, code, total, limit and margin."""
    paths = list(code_paths) if code_paths is not None else package_code_paths()
    code = code_bytes(paths)
    total = code + artifact_bytes
    return {"spec": meta["spec"], "method": meta["method"], "compressor": meta["compressor"],
            "packed": meta["packed"], "groups": group_table(qtensors, meta["packed"],
                                                            meta["compressor"] if attribute else None),
            "raw_bytes": meta["raw_bytes"], "payload_bytes": meta["payload_bytes"],
            "header_bytes": artifact_bytes - meta["payload_bytes"], "artifact_bytes": artifact_bytes,
            "compressed_sizes": meta.get("compressed_sizes", {}), "code_files": [str(p) for p in paths],
            "code_bytes": code, "total_bytes": total, "limit_bytes": limit, "margin_bytes": limit - total,
            "fits": total <= limit}


SpecQuantizer = Callable[[str], list[QuantTensor]]


def spec_quantizer(state: dict[str, torch.Tensor], cfg: Config, *, small_numel: int = SMALL_NUMEL,
                   hessians: dict[str, torch.Tensor] | None = None) -> SpecQuantizer:
    """quantize_state_dict as a function of the spec, quantizing each (tensor, format) pair only once."""
    rows, hessians, cache = trimmed_rows(cfg), hessians or {}, {}

    def quantize(spec: str) -> list[QuantTensor]:
        groups, out = parse_spec(spec), []
        for name, t in state.items():
            fmt = tensor_format(name, t, groups, small_numel)
            if (name, fmt) not in cache:
                cache[name, fmt] = quantize_tensor(name, t, fmt, rows.get(name), hessians.get(name))
            out.append(cache[name, fmt])
        return out
    return quantize


def build_artifact(quantize: SpecQuantizer, cfg: Config, spec: str, *, compressor: str = "best",
                   packed: bool | None = None, method: str = "rtn", small_numel: int = SMALL_NUMEL,
                   extra: dict | None = None, code_paths: Iterable[Path] | None = None,
                   limit: int = LIMIT_BYTES, attribute: bool = True) -> tuple[bytes, dict]:
    """One spec's artifact bytes (in memory, not written) and size report."""
    qtensors = quantize(spec)
    data, meta = encode_artifact(qtensors, cfg, spec, compressor=compressor, packed=packed, method=method,
                                 small_numel=small_numel, extra=extra)
    return data, size_report(qtensors, meta, len(data), code_paths=code_paths, limit=limit, attribute=attribute)


def choose_spec(quantize: SpecQuantizer, cfg: Config, *, specs: Iterable[str] = AUTO_SPECS,
                min_margin: int = AUTO_MIN_MARGIN, limit: int = LIMIT_BYTES, attribute: bool = True,
                **options) -> tuple[bytes, dict]:
    """The first spec whose total leaves >= min_margin under limit (else the last tried): (bytes, report).

    A spec that quantizes every tensor as an earlier one did (it differs only in a group the model
    lacks or whose tensors all stay fp16) is skipped: it would give the same artifact.
    `options` go to build_artifact (compressor, packed, method, small_numel, extra, code_paths).
    """
    tried, seen, skipped, best = [], set(), [], None
    for spec in specs:
        formats = tuple((qt.name, qt.format) for qt in quantize(spec))
        if formats in seen:
            skipped.append(spec)
            continue
        seen.add(formats)
        data, report = build_artifact(quantize, cfg, spec, limit=limit, attribute=False, **options)
        tried.append({"spec": spec, "total_bytes": report["total_bytes"], "margin": report["margin_bytes"]})
        best = (spec, data, report)
        if report["margin_bytes"] >= min_margin:
            break
    if best is None:
        raise ValueError("quant auto: no candidate specs")
    spec, data, report = best
    if attribute:  # per-group compression, for the chosen spec only
        report["groups"] = group_table(quantize(spec), report["packed"], report["compressor"])
    report.update(spec_requested="auto", min_margin=min_margin, auto_tried=tried, auto_skipped=skipped)
    return data, report


def export_hessians(model: torch.nn.Module, cfg: Config, method: str, calib_data: Path | None,
                    calib_batches: int, calib_rows: int) -> dict[str, torch.Tensor] | None:
    """GPTQ's Hessians from calibration batches of the train shards; None for rtn."""
    if method not in METHODS:
        raise ValueError(f"quantization method must be one of {METHODS}, got {method!r}")
    if method != "gptq":
        return None
    if calib_data is None:
        raise ValueError("method 'gptq' needs calibration data (a folder with fineweb_train_*.bin)")
    from ..data import read_shard, shard_paths

    train_tokens = read_shard(shard_paths(calib_data, "train")[0], cfg.vocab_size)
    return collect_hessians(model, calibration_batches(cfg, train_tokens, calib_batches, calib_rows, seed=cfg.seed))


def oversize_message(out_path: Path, report: dict) -> str:
    """One line: by how much code + artifact misses the limit (or, for auto, the required margin)."""
    sizes = (f"code {report['code_bytes']:,} + artifact {report['artifact_bytes']:,} = "
             f"{report['total_bytes']:,} bytes")
    if report.get("spec_requested") == "auto":
        return (f"{out_path}: quant auto: no spec leaves {report['min_margin']:,} bytes under the "
                f"{report['limit_bytes']:,}-byte limit; the least precise, {report['spec']}, totals {sizes} "
                f"(margin {report['margin_bytes']:,}); not written (allow oversize to write it anyway)")
    return (f"{out_path}: {sizes} exceeds the {report['limit_bytes']:,}-byte limit by "
            f"{-report['margin_bytes']:,}; not written (allow oversize to write it anyway)")


def export_artifact(checkpoint_path: Path, out_path: Path, spec: str, compressor: str = "best", *,
                    method: str = "rtn", packed: bool | None = None, small_numel: int = SMALL_NUMEL,
                    calib_data: Path | None = None, calib_batches: int = 8, calib_rows: int = 8,
                    code_paths: Iterable[Path] | None = None, limit: int = LIMIT_BYTES,
                    allow_oversize: bool = False, attribute: bool = True,
                    min_margin: int = AUTO_MIN_MARGIN) -> dict:
    """Quantize a checkpoint, compress it, refuse if code + artifact > limit, write atomically; the size report.

    spec "auto" takes the first of AUTO_SPECS that leaves >= min_margin bytes under the limit.
    """
    from ..checkpoint import load_model

    model, cfg, state = load_model(checkpoint_path)
    hessians = export_hessians(model, cfg, method, calib_data, calib_batches, calib_rows)
    quantize = spec_quantizer(model.state_dict(), cfg, small_numel=small_numel, hessians=hessians)
    options = dict(compressor=compressor, packed=packed, method=method, small_numel=small_numel,
                   extra={"tokenizer": state.get("tokenizer")}, code_paths=code_paths, limit=limit,
                   attribute=attribute)
    if spec == "auto":
        data, report = choose_spec(quantize, cfg, min_margin=min_margin, **options)
        short = report["margin_bytes"] < min_margin
    else:
        data, report = build_artifact(quantize, cfg, spec, **options)
        short = not report["fits"]
    report["artifact"] = str(out_path)
    if short and not allow_oversize:
        raise OversizeError(oversize_message(Path(out_path), report), report)
    write_bytes_atomic(Path(out_path), data)
    return report


def format_size_table(report: dict) -> str:
    """The report as a table: groups, then artifact, code, total, limit and margin."""
    lines = [f"spec {report['spec']} | method {report['method']} | compressor {report['compressor']} | "
             f"{'bit-packed' if report['packed'] else 'one code per byte'}",
             *auto_lines(report),
             f"{'group':8s} {'formats':>12s} {'params':>12s} {'fp32 bytes':>13s} {'quant bytes':>13s} "
             f"{'compressed*':>13s}"]
    for r in report["groups"] + [total_row(report["groups"])]:
        compressed = f"{r['compressed_bytes']:,}" if "compressed_bytes" in r else "-"
        lines.append(f"{r['group']:8s} {'/'.join(r['formats']):>12s} {r['params']:>12,} {r['fp32_bytes']:>13,} "
                     f"{r['quant_bytes']:>13,} {compressed:>13s}")
    if "compressed_bytes" in report["groups"][0]:
        lines.append("* each group compressed on its own, for attribution; the artifact compresses "
                     "the whole payload once")
    if len(report["compressed_sizes"]) > 1:
        lines.append("compressors tried: " + ", ".join(f"{n} {b:,}" for n, b in report["compressed_sizes"].items()))
    verdict = "fits" if report["fits"] else f"OVER by {-report['margin_bytes']:,}"
    lines += [f"{'payload (compressed once)':28s} {report['payload_bytes']:>12,}",
              f"{'header + metadata':28s} {report['header_bytes']:>12,}",
              f"{'artifact file':28s} {report['artifact_bytes']:>12,}",
              f"{'code (%d files)' % len(report['code_files']):28s} {report['code_bytes']:>12,}",
              f"{'total':28s} {report['total_bytes']:>12,}",
              f"{'limit':28s} {report['limit_bytes']:>12,}",
              f"{'margin':28s} {report['margin_bytes']:>12,}  ({verdict})"]
    return "\n".join(lines)


def auto_lines(report: dict) -> list[str]:
    """For spec auto: which spec it chose, and every spec it tried with its total bytes."""
    if report.get("spec_requested") != "auto":
        return []
    tried = ", ".join(f"{t['spec']} {t['total_bytes']:,}" for t in report["auto_tried"])
    return [f"quant auto chose {report['spec']} (tried: {tried}; needs margin >= {report['min_margin']:,})"]


def total_row(groups: list[dict]) -> dict:
    """The sum of the group rows (compressed bytes summed over separately compressed groups)."""
    row = {"group": "total", "formats": sorted({f for g in groups for f in g["formats"]}),
           **{k: sum(g[k] for g in groups) for k in ("params", "fp32_bytes", "quant_bytes")}}
    if groups and "compressed_bytes" in groups[0]:
        row["compressed_bytes"] = sum(g["compressed_bytes"] for g in groups)
    return row


# ---------------------------------------------------------------- the quantization penalty

def quantization_penalty(model: torch.nn.Module, quantized: torch.nn.Module, val_tokens: np.ndarray,
                         byte_table, cfg: Config, *, steps: int, num_seqs: int, seed: int = 0,
                         device: torch.device | None = None, reference: dict | None = None) -> dict:
    """Strict bpb before and after quantization on the same mask draws: the gap is the penalty, not noise.

    `reference` is the float model's strict result from an earlier call with the same settings
    (it saves re-evaluating the float model for every spec).
    """
    from ..eval import evaluate

    def strict(m: torch.nn.Module) -> dict:
        return evaluate(m, val_tokens, byte_table, cfg, steps=steps, num_seqs=num_seqs, seed=seed,
                        modes=("strict",), device=device)["strict"]

    before = reference if reference is not None else strict(model)
    after = strict(quantized)
    return {"float": before, "quantized": after, "delta_bpb": after["bpb"] - before["bpb"]}
