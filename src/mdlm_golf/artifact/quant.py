"""Which format for which tensor (groups and specs), and quantizing a state dict to stored tensors."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..config import Config
from .gptq import gptq_codes
from .rounding import clip_search, dequantize_rows, qmax, quantize_rows

FORMAT_BITS = {"int8": 8, "int6": 6, "int5": 5, "int4": 4, "fp16": 16}
GROUPS = ("embed", "attn", "mlp", "head", "adaln")
# Tensors under this many values stay fp16: their scales would cost more than they save
# (the challenge's baseline keeps float tensors <= 65,536 values).
SMALL_NUMEL = 65_536


# ---------------------------------------------------------------- spec: which format for which tensor

def param_group(name: str) -> str:
    """The quantization group of an MDLM state-dict entry."""
    if name == "embed.weight" or name.startswith("digits."):  # a sub-token model's digit embeddings too
        return "embed"
    if name == "head.weight":
        return "head"
    # final_modulation / blocks.N.modulation: the learned constants that stand in for adaLN (time_cond off)
    if name.startswith(("final_adaln.", "noise.", "final_modulation")):
        return "adaln"
    parts = name.split(".")
    if len(parts) > 2 and parts[0] in ("blocks", "decoder") and parts[2] in ("attn", "mlp", "adaln", "modulation"):
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


def tensor_format(name: str, tensor: torch.Tensor, groups: dict[str, str], small_numel: int) -> str:
    """Its group's format for a large matrix; fp16 for vectors, scalars and small tensors."""
    if tensor.dim() != 2 or tensor.numel() < small_numel:
        return "fp16"
    return groups[param_group(name)]


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


def dequantize_state_dict(qtensors: list[QuantTensor]) -> dict[str, torch.Tensor]:
    """The float32 state dict the artifact loads as."""
    return {qt.name: dequantize_tensor(qt) for qt in qtensors}


SpecQuantizer = Callable[[str], list[QuantTensor]]


def spec_quantizer(state: dict[str, torch.Tensor], cfg: Config, *, small_numel: int = SMALL_NUMEL,
                   hessians: dict[str, torch.Tensor] | None = None) -> SpecQuantizer:
    """The state dict quantized as a function of the spec (GPTQ where a Hessian is given, else RTN).

    Each (tensor, format) pair is quantized once however many specs ask for it.
    """
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
