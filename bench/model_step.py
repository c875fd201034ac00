"""Model + loss forward and backward on one fixed demo batch: the training math alone, no loader or
optimizer, so two versions of the package can be compared (prints the median ms of the last 14 of 16).

    OMP_NUM_THREADS=1 python bench/model_step.py
    OMP_NUM_THREADS=1 PYTHONPATH=<worktree of an older commit>/src python bench/model_step.py

An older commit keeps its own diffusion_loss where it had it: compare only commits with this file's imports.
"""
from __future__ import annotations

import statistics
import time

import torch

from mdlm_golf.config import build_config
from mdlm_golf.model import Transformer
from mdlm_golf.objective import diffusion_loss


def main() -> None:
    cfg = build_config("demo", environ={})
    torch.manual_seed(0)
    model = Transformer(cfg)
    x0 = torch.randint(4, 1000, (16, 256))
    x0[:, ::97] = 1  # BOS: three documents per row
    times = []
    for i in range(16):
        began = time.perf_counter()
        out = diffusion_loss(model, x0, cfg.tokens, cfg.noise_eps, "packed", torch.Generator().manual_seed(i), 1.0)
        out.loss.backward()
        times.append(time.perf_counter() - began)
    print(f"{1000 * statistics.median(times[2:]):.1f} ms per forward + backward (median of 14)")


if __name__ == "__main__":
    main()
