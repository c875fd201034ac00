"""torch.compile changes speed, not numbers: the compiled ELBO and training loss equal the eager ones."""
from __future__ import annotations

import dataclasses

import pytest
from conftest import synthetic_byte_table
import torch

from mdlm_golf.config import BOS_ID, build_config
from mdlm_golf.diffusion import draw_noise
from mdlm_golf.eval import evaluate
from mdlm_golf.model import Transformer
from mdlm_golf.objective import LossModule, objective_for


def perturbed_tiny_model(**overrides):
    cfg = build_config("tiny", environ={}, overrides=overrides)
    torch.manual_seed(0)
    model = Transformer(cfg)
    for p in model.parameters():  # the zero-initialized head and adaLN would make every figure 10 bits
        torch.nn.init.normal_(p, std=0.1)
    return model, cfg


@pytest.mark.slow
def test_compiled_evaluation_and_loss_match_eager():
    model, cfg = perturbed_tiny_model(eval_batch_rows=16)
    generator = torch.Generator().manual_seed(1)
    val = torch.randint(4, cfg.vocab_size, (6 * cfg.seq_len,), generator=generator).numpy()
    val[:: 40] = BOS_ID
    table = synthetic_byte_table()
    eager = evaluate(model, val, table, cfg, steps=4, num_seqs=6, seed=3, modes=("strict",))
    compiled = evaluate(model, val, table, dataclasses.replace(cfg, compile=True), steps=4, num_seqs=6, seed=3,
                        modes=("strict",))
    assert compiled["strict"]["bpb"] == pytest.approx(eager["strict"]["bpb"], abs=1e-4)

    prepare = objective_for(dataclasses.replace(cfg, layout="packed", anchor_mask_prob=0.0))
    x0 = torch.from_numpy(val[: 4 * cfg.seq_len].reshape(4, cfg.seq_len)).long()
    batch = prepare(x0, draw_noise(4, cfg.seq_len, torch.Generator().manual_seed(2)))
    loss_module = LossModule(model)
    want = loss_module(*batch.loss_args())
    got = torch.compile(loss_module)(*batch.loss_args())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
