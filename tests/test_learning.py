"""End to end on the shared corpus: a small MDLM trained for a few hundred CPU steps really learns."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mdlm_golf.config import build_config
from mdlm_golf.train import train

# A small model, large enough batches that the 1/t-weighted loss is not all noise, and a warmdown.
# Packed rows: the shared corpus is mostly short quotations, so padded rows would be mostly PAD.
SETTINGS = dict(num_layers=2, model_dim=64, num_heads=2, seq_len=128, batch_rows=16, steps=250,
                lr=3e-3, warmup_steps=20, warmdown_steps=60, elbo_steps=16, eval_num_seqs=8,
                log_every=10, layout="packed")


@pytest.mark.slow
def test_training_lowers_strict_bpb_well_below_initialization(prepared_data, shared_tokenizer_path, tmp_path):
    cfg = build_config("tiny", environ={}, overrides=SETTINGS)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    summary = train(cfg, prepared_data, tmp_path / "run", shared_tokenizer_path, run_eval=True,
                    device=torch.device("cpu"), echo=lambda line: None)

    assert summary["steps"] == cfg.steps
    strict = summary["eval"]["strict"]
    assert strict["tokens"] == cfg.eval_num_seqs * cfg.seq_len  # the first slices of val, no PAD
    # At initialization the head is zero: 10 bits per token (log2 1024) in expectation, so the
    # bpb of these slices is 10 / bytes_per_token.
    init_bpb = math.log2(cfg.vocab_size) / strict["bytes_per_token"]
    assert strict["bpb"] < 0.85 * init_bpb, (strict["bpb"], init_bpb)  # a unigram model: ~0.80

    # the training loss in metrics.jsonl goes down
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    assert len(losses) == cfg.steps // cfg.log_every
    assert all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert (tmp_path / "run" / "model.pt").is_file()
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["strict"]["bpb"] == strict["bpb"]
