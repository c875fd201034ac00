"""The evaluation budget: a timed probe fits the ELBO steps so the whole split's projected time fits."""
from __future__ import annotations

import pytest
import torch
from conftest import synthetic_byte_table

from mdlm_golf.config import BOS_ID, build_config
from mdlm_golf.eval import plan_elbo_steps
from mdlm_golf.eval.budget import EVAL_BUDGET_SECONDS, EVAL_SPARE, steps_within
from mdlm_golf.model import Transformer


@pytest.mark.parametrize("projected, expected", [(300.0, 128), (480.0, 128), (960.0, 64), (1e9, 1)])
def test_steps_within_scale_down_linearly_and_never_up(projected, expected):
    assert steps_within(128, projected, 480.0) == expected


def test_the_record_preset_scores_the_whole_split_within_the_budget():
    cfg = build_config("record", environ={})
    assert cfg.eval_num_seqs == 0  # the whole val split, as the challenge scores
    assert EVAL_BUDGET_SECONDS * (1 - EVAL_SPARE) == 480.0


def test_plan_projects_the_probe_and_cuts_the_steps_to_the_budget():
    cfg = build_config("tiny", environ={}, overrides={"elbo_steps": 16})
    model = Transformer(cfg)
    val = torch.randint(4, cfg.vocab_size, (40 * cfg.seq_len,), generator=torch.Generator().manual_seed(0)).numpy()
    val[::50] = BOS_ID
    roomy = plan_elbo_steps(model, val, synthetic_byte_table(), cfg, torch.device("cpu"), budget=1e9)
    assert roomy.steps == 16 and roomy.processes == 1 and roomy.projected_seconds > 0
    tight = plan_elbo_steps(model, val, synthetic_byte_table(), cfg, torch.device("cpu"),
                            budget=roomy.projected_seconds / 4)
    assert 1 <= tight.steps < 16  # a quarter of the time: about a quarter of the steps (probes vary)
    assert "the whole val split (2,560 tokens) at" in tight.describe(val.size)
