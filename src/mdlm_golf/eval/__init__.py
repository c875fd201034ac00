"""Evaluation stage: one entry point (entry.py) over one harness (slices, bytes, scored positions, the rank
split and reduce, summaries) and three figures in bits per byte: the discrete ELBO (elbo.py), planned-order
code lengths (planned.py), the exact AR chain rule (ar.py); and the evaluation-time budget (budget.py)."""
from .budget import EvalPlan, plan_elbo_steps
from .entry import EVAL_METHODS, evaluate
from .harness import EXACT, HEADLINE_MODES, MODES, format_headline, format_result, headline, projected_seconds
from .planned import ORDERS, Schedule, check_order, masked_start, run_planned

__all__ = [
    "EvalPlan", "plan_elbo_steps", "EVAL_METHODS", "evaluate", "EXACT", "HEADLINE_MODES", "MODES",
    "format_headline", "format_result", "headline", "projected_seconds", "ORDERS", "Schedule", "check_order",
    "masked_start", "run_planned",
]
