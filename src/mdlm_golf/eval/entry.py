"""The one evaluation entry point: the model's figure on the val split, in bits per byte.

An autoregressive model's figure is the exact chain rule (ar.py); a masked-diffusion model's is the
T-step ELBO upper bound (elbo.py) or, with method "planned", the exact code length of planned-order
decoding (planned.py). All three share the harness's slices, bytes, rank split and float64 reduce.
"""
from __future__ import annotations

import numpy as np
import torch

from ..config import Config
from ..data import ByteTable
from .ar import evaluate_ar
from .elbo import evaluate_elbo
from .harness import EXACT, MODES, eval_mode
from .planned import evaluate_planned

EVAL_METHODS = ("elbo", "planned")
# Block diffusion in blocks of at most this many tokens also gets its exact figure beside the ELBO: decoded
# left to right inside each block, one token per (cached) pass, its code length was below the per-block
# ELBO (BENCHMARKS.md: 2.675 against 2.793 bpb in blocks of 4), at B network evaluations per block
EXACT_MAX_BLOCK = 4


def evaluate(model, val_tokens: np.ndarray, byte_table: ByteTable, cfg: Config, *, num_seqs: int,
             method: str = "elbo", modes: tuple[str, ...] = MODES, device: torch.device | None = None,
             steps: int | None = None, seed: int | None = None, draws: int = 1, grid: str = "linear",
             order: str = "left-to-right", passes: int | None = None,
             tokens_per_pass: int | None = None) -> dict[str, dict]:
    """{mode: figure} of `model` on the first num_seqs val slices (0 = all), in eval mode throughout.

    elbo: steps (default cfg.elbo_steps), mask seed (default cfg.seed), draws, grid; a block diffusion
    model in blocks of at most EXACT_MAX_BLOCK tokens also gets "{mode} exact", its left-to-right
    planned code length. planned: order and passes or tokens_per_pass. An AR model has one exact
    figure, {"ar": ...}, whatever the method (its planned order is left to right, one token per pass:
    the chain rule itself). headline() picks the figure a run is judged by.
    """
    if method not in EVAL_METHODS:
        raise ValueError(f"method must be one of {EVAL_METHODS}, got {method!r}")
    device = device or next(model.parameters()).device
    network = torch.compile(model) if cfg.compile and method == "elbo" else model
    with eval_mode(model):
        if cfg.autoregressive:
            if method == "planned" and order != "left-to-right":
                raise ValueError(f"an autoregressive model decodes left to right only, not in order {order!r}")
            return {"ar": evaluate_ar(network, val_tokens, byte_table, cfg, num_seqs=num_seqs, device=device)}
        if method == "planned":
            cfg.require_token_level("planned-order decoding")
            return evaluate_planned(model, val_tokens, byte_table, cfg, order=order, passes=passes,
                                    tokens_per_pass=tokens_per_pass, num_seqs=num_seqs, modes=modes, device=device)
        results = evaluate_elbo(network, val_tokens, byte_table, cfg,
                                steps=cfg.elbo_steps if steps is None else steps, num_seqs=num_seqs,
                                seed=cfg.seed if seed is None else seed, modes=modes, draws=draws, grid=grid,
                                device=device)
        if 0 < cfg.block_size <= EXACT_MAX_BLOCK:  # small blocks: the exact code is the tighter figure
            exact = evaluate_planned(model, val_tokens, byte_table, cfg, order="left-to-right", tokens_per_pass=1,
                                     num_seqs=num_seqs, modes=modes, device=device)
            results.update({f"{mode} {EXACT}": r for mode, r in exact.items()})
        return results
