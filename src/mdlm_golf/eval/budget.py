"""How many ELBO steps the challenge's evaluation budget allows: a timed probe on a few slices per process,
projected to the whole val split on this many processes (the figure `eval` prints), before the real run."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import Config
from ..data import ByteTable
from ..dist import rank_and_world
from .entry import evaluate
from .harness import HEADLINE_MODES, headline, projected_seconds

EVAL_BUDGET_SECONDS = 600.0  # the challenge's limit on evaluation time
EVAL_SPARE = 0.2  # kept free: the projection is a probe on a few slices, not a promise
PROBE_SLICES = 4  # slices per process the probe times


@dataclass(frozen=True)
class EvalPlan:
    """The ELBO steps to evaluate with and what the probe projected for them."""

    steps: int  # cfg.elbo_steps, or fewer where their projection would not fit the budget
    projected_seconds: float  # the whole split at `steps`, on `processes` processes like these
    processes: int
    budget_seconds: float  # EVAL_BUDGET_SECONDS less the spare

    def describe(self, tokens: int) -> str:
        return (f"eval plan: the whole val split ({tokens:,} tokens) at {self.steps} ELBO steps projects to "
                f"~{self.projected_seconds:.0f}s on {self.processes} process(es); budget "
                f"{self.budget_seconds:.0f}s of the challenge's {EVAL_BUDGET_SECONDS:.0f}s")


def steps_within(steps: int, projected: float, budget: float) -> int:
    """The most steps, at most `steps`, whose time fits `budget` if `steps` take `projected` (linear in steps)."""
    return steps if projected <= budget else max(1, int(steps * budget / projected))


def plan_elbo_steps(model, val_tokens: np.ndarray, byte_table: ByteTable, cfg: Config, device: torch.device,
                    *, probe_slices: int = PROBE_SLICES,
                    budget: float = EVAL_BUDGET_SECONDS * (1 - EVAL_SPARE)) -> EvalPlan:
    """Time the headline figure on probe_slices slices per process at cfg.elbo_steps and fit the steps
    to the budget. The probe's first forwards carry warm-up costs, so it errs on the slow side."""
    world = rank_and_world()[1]
    probe = headline(evaluate(model, val_tokens, byte_table, cfg, num_seqs=probe_slices * world,
                              modes=HEADLINE_MODES, device=device))
    projected = projected_seconds(probe, val_tokens.size, processes=world)
    steps = cfg.elbo_steps if cfg.autoregressive else steps_within(cfg.elbo_steps, projected, budget)
    return EvalPlan(steps, projected * steps / cfg.elbo_steps, world, budget)
