"""Evaluation stage: one harness (slices, bytes, scored positions, summaries) and three figures in bits per
byte: the discrete ELBO (elbo.py), planned-order code lengths (planned.py), the exact AR chain rule (ar.py)."""
from .elbo import evaluate
from .harness import HEADLINE_MODES, MODES, format_result, headline, projected_seconds
from .planned import (ORDERS, Schedule, check_order, evaluate_planned, format_planned_result, masked_start,
                      require_mdlm, run_planned)

__all__ = [
    "evaluate", "HEADLINE_MODES", "MODES", "format_result", "headline", "projected_seconds", "ORDERS",
    "Schedule", "check_order", "evaluate_planned", "format_planned_result", "masked_start",
    "require_mdlm", "run_planned",
]
