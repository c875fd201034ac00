"""GPTQ: error-compensated rounding from the Hessians of each Linear's inputs over calibration batches."""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import numpy as np
import torch

from ..config import Config
from ..diffusion import Noise, mask_shape
from ..objective import LossBatch, objective_for
from .rounding import qmax


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
def collect_hessians(model: torch.nn.Module, batches: Iterable[LossBatch]) -> dict[str, torch.Tensor]:
    """H = X^T X of every Linear's input over calibration batches (what the model reads in training),
    keyed 'NAME.weight'."""
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
        for batch in batches:
            model(batch.inputs, batch.sigma, batch.clean)
    finally:
        for h in hooks:
            h.remove()
    return {name: h.cpu() for name, h in hessians.items()}


def calibration_batches(cfg: Config, tokens: np.ndarray, num_batches: int, rows: int,
                        seed: int = 0) -> list[LossBatch]:
    """Training batches of the model's own objective from contiguous windows of train tokens: masked
    with t ~ U(0, 1) per row for a masked-diffusion model (every BOS maskable), the clean rows for AR."""
    generator = torch.Generator().manual_seed(seed)
    windows = tokens.size // cfg.seq_len
    if windows < 1:
        raise ValueError(f"calibration needs at least {cfg.seq_len} tokens, got {tokens.size}")
    prepare = objective_for(dataclasses.replace(cfg, anchor_mask_prob=1.0))
    batches = []
    for _ in range(num_batches):
        starts = torch.randint(windows, (rows,), generator=generator) * cfg.seq_len
        x0 = torch.from_numpy(np.stack([tokens[s:s + cfg.seq_len] for s in starts.tolist()]).astype(np.int64))
        t = torch.rand(rows, generator=generator)
        mask_u = torch.rand(mask_shape(rows, cfg.seq_len, cfg.subtokens), generator=generator)
        batches.append(prepare(x0, Noise(t, mask_u, torch.zeros(x0.shape))))
    return batches
