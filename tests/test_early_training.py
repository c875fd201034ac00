"""The plateau levers: a time warmup (fewer near-fully-masked rows early), the flat loss weight, the init scale."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mdlm_golf.config import BOS_ID, build_config
from mdlm_golf.diffusion import draw_noise, elbo_weight
from mdlm_golf.model import Transformer
from mdlm_golf.objective import loss_name, objective_for
from mdlm_golf.train.loop import step_noise, time_ceiling

CPU = torch.device("cpu")


def test_the_time_warmup_scales_early_times_and_leaves_later_ones():
    cfg = build_config("tiny", environ={}, overrides=dict(time_warmup_steps=10, time_warmup_start=0.2))
    plain = dataclasses.replace(cfg, time_warmup_steps=0)
    assert [time_ceiling(s, cfg) for s in (0, 5, 10, 50)] == pytest.approx([0.2, 0.6, 1.0, 1.0])
    for step in (0, 5):
        warm, cold = step_noise(cfg, step, 1, CPU), step_noise(plain, step, 1, CPU)
        assert torch.allclose(warm.t, cold.t * time_ceiling(step, cfg)) and torch.equal(warm.mask_u, cold.mask_u)
        assert warm.t.max() <= time_ceiling(step, cfg)
    assert torch.equal(step_noise(cfg, 10, 1, CPU).t, step_noise(plain, 10, 1, CPU).t)


@pytest.mark.parametrize("warmup, flat_steps", [(0, {0, 2, 3, 5, 500}), (3, {0, 2})])
def test_the_flat_weight_counts_every_masked_token_once(warmup, flat_steps):
    cfg = build_config("tiny", environ={}, overrides=dict(loss_weight="flat", loss_warmup_steps=warmup))
    x0 = torch.randint(4, 1000, (4, cfg.seq_len), generator=torch.Generator().manual_seed(0))
    x0[:, 0] = BOS_ID
    noise = draw_noise(4, cfg.seq_len, torch.Generator().manual_seed(1))
    for step in (0, 2, 3, 5, 500):
        batch = objective_for(cfg)(x0, noise, step)
        want = torch.ones(4) if step in flat_steps else elbo_weight(noise.t, cfg.noise_eps)
        assert torch.equal(batch.row_weight, want)
    elbo = objective_for(dataclasses.replace(cfg, loss_weight="elbo"))(x0, noise, 0)
    assert torch.equal(elbo.row_weight, elbo_weight(noise.t, cfg.noise_eps))


def test_init_std_scales_the_normal_init_and_keeps_the_zero_starts():
    small = Transformer(build_config("tiny", environ={}, overrides=dict(init_std=0.005)))
    default = Transformer(build_config("tiny", environ={}))
    ratio = (small.embed.weight.std() / default.embed.weight.std()).item()
    assert ratio == pytest.approx(0.25, rel=0.05)
    assert small.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.005, rel=0.05)
    assert not small.head.weight.detach().any() and not small.blocks[0].adaln.weight.detach().any()


def test_the_logged_loss_is_named_for_what_it_is():
    """A flat weight makes the training loss no longer the ELBO: nothing may call it one."""
    assert loss_name(build_config("tiny", environ={})) == "continuous-time ELBO"
    assert "not a bound" in loss_name(build_config("tiny", environ={}, overrides=dict(loss_weight="flat")))
    assert "first 200 steps" in loss_name(build_config("tiny", environ={},
                                                       overrides=dict(loss_weight="flat", loss_warmup_steps=200)))
    assert loss_name(build_config("tiny", environ={}, overrides=dict(objective="ar"))) == "next-token cross-entropy"
