"""Per-row symmetric rounding: integer codes in [-qmax, qmax] times one fp16 scale per row, clip search."""
from __future__ import annotations

import math
from typing import Iterable

import torch

CLIP_FRACTIONS = tuple(1.0 - 0.025 * k for k in range(21))  # 1.0 first: ties keep the unclipped row
FP16_TINY = 2.0 ** -24  # smallest positive fp16: a scale never underflows to 0


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
