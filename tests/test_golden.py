"""Golden losses: a fixed tiny config trained 50 CPU steps logs exactly the pinned losses.

A change to the math (model, masking, loss, optimizer, schedule, data order, initialization) changes
these numbers. Such a change must come with new pinned values, and a BENCHMARKS.md note saying why
they moved; a test failing here without such a change is a regression.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import small_data
from mdlm_golf.config import build_config
from mdlm_golf.train.loop import train

# Every field the losses depend on, pinned here rather than read from the "tiny" preset.
SETTINGS = dict(num_layers=2, model_dim=64, num_heads=2, mlp_mult=3, cond_dim=32, seq_len=64, batch_rows=8,
                grad_accum=1, steps=50, lr=3e-3, muon_lr=0.02, warmup_steps=5, warmdown_steps=10,
                weight_decay=0.1, grad_clip=1.0, layout="packed", anchor_mask_prob=0.0, seed=1337,
                log_every=10)

# Losses at steps 10, 20, 30, 40, 50, as logged (float32 math on one CPU thread: bit-identical run to run
# here; rel 1e-5 leaves room for another CPU's kernels, far below what a change to the math moves).
GOLDEN = {
    "mdlm-adamw": ({"objective": "mdlm", "optimizer": "adamw"},
                   [6.963621953304665, 6.14418340732558, 6.106363268078236, 5.8847193956841695, 5.695513268476583]),
    "ar-adamw": ({"objective": "ar", "optimizer": "adamw"},
                 [6.808098929268974, 6.150588553292411, 5.7515379406157, 5.478808690631201, 5.158094666496155]),
    "mdlm-muon": ({"objective": "mdlm", "optimizer": "muon"},
                  [6.959782875659418, 6.146484613880515, 6.108205126592265, 5.886373285304776, 5.704445297910807]),
    # block diffusion's [x_t ; x_0] forward, pinned before the model kinds moved into the model (issue 20)
    "block4-adamw": ({"block_size": 4},
                     [6.961379106440807, 6.147069590576305, 6.110120973529218, 5.881901337815824, 5.68741161429577]),
    "block4-best": ({"block_size": 4, "optimizer": "muon", "anchor_mask_prob": 1.0},
                    [6.962328577041626, 6.148921108245849, 6.100083684921264, 5.873423290252686, 5.688664102554322]),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, shared_docs_path, shared_tokenizer_path) -> Path:
    """The first 200 fixture documents: 10 val documents, train in 20k-token shards."""
    return small_data(tmp_path_factory.mktemp("golden"), shared_docs_path, shared_tokenizer_path, 200,
                      val_docs=10, shard_tokens=20_000)


@pytest.mark.parametrize("name", list(GOLDEN))
def test_logged_losses_match_the_pinned_values(data_dir, shared_tokenizer_path, tmp_path, name):
    assert torch.get_num_threads() == 1  # conftest's quiet_environment: one thread, one summation order
    overrides, golden = GOLDEN[name]
    cfg = build_config("tiny", environ={}, overrides={**SETTINGS, **overrides})
    train(cfg, data_dir, tmp_path / "RUN", shared_tokenizer_path, run_eval=False, device=torch.device("cpu"),
          echo=lambda line: None)
    records = [json.loads(line) for line in (tmp_path / "RUN" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30, 40, 50]
    losses = [r["loss"] for r in records]
    assert losses == pytest.approx(golden, rel=1e-5, abs=0), losses
