"""Evaluation stage: the discrete ELBO, planned-order code lengths and the exact AR chain rule, in bits per byte."""
from .elbo import HEADLINE_MODES, MODES, evaluate, format_result, headline, projected_seconds
from .planned import ORDERS, Schedule, check_order, evaluate_planned, format_planned_result, masked_start, require_mdlm, run_planned
