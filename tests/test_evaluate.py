"""The metric: exact ELBO expectation, modes, slices and bytes, determinism, the uniform baseline."""
from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import UnigramDenoiser, synthetic_byte_table, synthetic_val, zipf_unigram
import torch
from torch import nn

from mdlm_golf.config import BOS_ID, Tokens, build_config
from mdlm_golf.diffusion import elbo_grid, masked_nll, reveal_weights
from mdlm_golf.eval import evaluate
from mdlm_golf.eval.elbo import elbo_bits, slice_mask_draws
from mdlm_golf.eval.harness import LEGACY_BYTES_PER_TOKEN, make_slices
from mdlm_golf.model import Transformer

V = 1024
PAD = V + 1
CPU = torch.device("cpu")


class NeighbourDenoiser(nn.Module):
    """Context-dependent but row-local and exactly batch-invariant: logits from the two neighbours."""

    def __init__(self, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("left", torch.randn(V + 2, V + 2, generator=gen))
        self.register_buffer("right", torch.randn(V + 2, V + 2, generator=gen))
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x_t, sigma, clean=None, doc_ids=None):
        prev = torch.cat([torch.full_like(x_t[:, :1], PAD), x_t[:, :-1]], 1)
        nxt = torch.cat([x_t[:, 1:], torch.full_like(x_t[:, :1], PAD)], 1)
        return self.left[prev] + self.right[nxt] + 0.1 * sigma.float()[:, None, None]


def small_cfg(**overrides):
    values = dict(seq_len=64, elbo_steps=16, eval_batch_rows=48, noise_eps=1e-3)
    values.update(overrides)
    return build_config("tiny", environ={}, overrides=values)


# ---------------------------------------------------------------- the ELBO is exact in expectation

@pytest.mark.parametrize("eps", [1e-3, 0.3])
def test_elbo_of_unigram_model_is_exact_in_expectation(eps):
    """E[strict bits] = sum_tokens (1 - alpha_T) * -log2 p(x) + alpha_T * log2 V, and likewise over
    the non-BOS tokens in anchored mode; averaged over seeds it must match within MC error."""
    p = zipf_unigram()
    cfg = small_cfg(noise_eps=eps, eval_batch_rows=128)
    val = synthetic_val(8 * cfg.seq_len - 17, p)  # a ragged tail: the last slice is PAD-filled
    table = synthetic_byte_table()
    model = UnigramDenoiser(p)
    nll_bits = -np.log2(p[val.astype(np.int64)])
    alpha_t = float(elbo_grid(cfg.elbo_steps, eps)[-1])
    assert alpha_t == pytest.approx(eps)
    expected = {
        "strict": ((1 - alpha_t) * nll_bits.sum() + alpha_t * math.log2(V) * val.size) / val.size,
        "anchored": ((1 - alpha_t) * nll_bits[val != BOS_ID].sum()
                     + alpha_t * math.log2(V) * (val != BOS_ID).sum()) / (val != BOS_ID).sum(),
    }
    samples = {"strict": [], "anchored": []}
    for seed in range(12):
        results = evaluate(model, val, table, cfg, steps=cfg.elbo_steps, num_seqs=0, seed=seed, device=CPU)
        for mode, r in results.items():
            samples[mode].append(r["bits_per_token"])
    for mode, values in samples.items():
        values = np.asarray(values)
        se = values.std(ddof=1) / math.sqrt(values.size)
        assert se < 0.01 * expected[mode]  # sharp enough that a few % error in the weights fails
        assert abs(values.mean() - expected[mode]) < 4.5 * se, (mode, values.mean(), expected[mode], se)
    if eps == 0.3:  # the terminal term matters: without it the figure would be ~3 bits/token lower
        assert np.mean(samples["strict"]) - (1 - alpha_t) * nll_bits.mean() > 2.5


def test_elbo_bits_per_slice_expectation_uses_reveal_weights():
    """Per slice, E[bits] = sum_k w_k (1 - alpha_k) * sum_tokens nll = (1 - alpha_T) * nll."""
    steps, eps = 8, 0.1
    w = reveal_weights(steps, eps)
    a = elbo_grid(steps, eps)
    assert float((w * (1 - a[1:])).sum()) == pytest.approx(1 - eps, rel=1e-12)
    assert float(w[0]) == pytest.approx(1.0)
    assert torch.all((w > 0) & (w <= 1))


# ---------------------------------------------------------------- modes, bytes and the summary

def test_modes_count_tokens_and_bytes_and_bpb_fields():
    p = zipf_unigram(1)
    cfg = small_cfg(elbo_steps=4)
    val = synthetic_val(5 * cfg.seq_len + 9, p, seed=1)
    table = synthetic_byte_table(1)
    results = evaluate(UnigramDenoiser(p), val, table, cfg, steps=4, num_seqs=0, seed=0, device=CPU)
    strict, anchored = results["strict"], results["anchored"]
    n_bos = int((val == BOS_ID).sum())
    assert n_bos > 5
    assert strict["tokens"] == val.size
    assert anchored["tokens"] == val.size - n_bos
    total_bytes = int(table.stream_bytes(val).sum())
    assert strict["bytes"] == anchored["bytes"] == total_bytes
    for r in (strict, anchored):
        assert r["bpb"] == pytest.approx(r["bits"] / r["bytes"], rel=1e-12)
        assert r["bits_per_token"] == pytest.approx(r["bits"] / r["tokens"], rel=1e-12)
        assert r["bytes_per_token"] == pytest.approx(r["bytes"] / r["tokens"], rel=1e-12)
        assert r["bpb_legacy_4p3"] == pytest.approx(r["bits"] / (r["tokens"] * 4.3), rel=1e-12)
        assert r["elbo_steps"] == 4 and r["num_seqs"] == 6 and r["seq_len"] == cfg.seq_len
    assert LEGACY_BYTES_PER_TOKEN == 4.3
    # anchored leaves out the BOS tokens' bits: strictly fewer bits in total
    assert anchored["bits"] < strict["bits"]


def test_evaluate_restores_training_mode():
    p = zipf_unigram()
    model = UnigramDenoiser(p).train()
    cfg = small_cfg(elbo_steps=2)
    evaluate(model, synthetic_val(200, p), synthetic_byte_table(), cfg, steps=2, num_seqs=1, seed=0)
    assert model.training
    model.eval()
    evaluate(model, synthetic_val(200, p), synthetic_byte_table(), cfg, steps=2, num_seqs=1, seed=0)
    assert not model.training


# ---------------------------------------------------------------- slices

def test_make_slices_are_contiguous_windows_with_stream_bytes():
    table = synthetic_byte_table(2)
    val = synthetic_val(1000, zipf_unigram(), seed=2)
    L = 64
    whole = table.stream_bytes(val)
    s = make_slices(val, L, 5, table, PAD)
    assert len(s) == 5 and s.tokens.shape == (5, L) and s.token_bytes.shape == (5, L)
    assert np.array_equal(s.index, np.arange(5))
    for i in range(5):
        assert np.array_equal(s.tokens[i], val[i * L:(i + 1) * L])
        # a slice's first token takes its predecessor from the previous slice
        assert np.array_equal(s.token_bytes[i], whole[i * L:(i + 1) * L])
    assert make_slices(val, L, 10_000, table, PAD).tokens.shape == (16, L)  # clamped to the split


def test_make_slices_whole_split_pads_the_tail():
    table = synthetic_byte_table(3)
    val = synthetic_val(1000, zipf_unigram(), seed=3)
    L = 64
    s = make_slices(val, L, 0, table, PAD)
    assert s.tokens.shape == (16, L)  # ceil(1000 / 64)
    flat_tokens, flat_bytes = s.tokens.reshape(-1), s.token_bytes.reshape(-1)
    assert np.array_equal(flat_tokens[:1000], val)
    assert np.all(flat_tokens[1000:] == PAD)
    assert np.all(flat_bytes[1000:] == 0)
    assert flat_bytes.sum() == table.stream_bytes(val).sum()
    assert np.array_equal(flat_bytes[:1000], table.stream_bytes(val))
    # an exact multiple of L has no PAD at all
    exact = make_slices(val[:960], L, 0, table, PAD)
    assert exact.tokens.shape == (15, L) and not np.any(exact.tokens == PAD)


def test_pad_tail_is_not_scored():
    """PAD positions add no tokens and no bits: the same stream with and without a tail agrees."""
    p = zipf_unigram()
    model = UnigramDenoiser(p)
    cfg = small_cfg(elbo_steps=4)
    table = synthetic_byte_table()
    val = synthetic_val(3 * cfg.seq_len + 5, p)
    r = evaluate(model, val, table, cfg, steps=4, num_seqs=0, seed=0, device=CPU)["strict"]
    assert r["tokens"] == val.size
    assert r["bytes"] == int(table.stream_bytes(val).sum())
    # bits of the full slices alone are identical when the tail slice is dropped (draws are per slice)
    head = evaluate(model, val, table, cfg, steps=4, num_seqs=3, seed=0, device=CPU)["strict"]
    slices = make_slices(val, cfg.seq_len, 0, table, cfg.tokens.pad)
    per_slice = elbo_bits(model, slices, "strict", 4, cfg.noise_eps, V, 0, 16, CPU)
    terminal = float(elbo_grid(4, cfg.noise_eps)[-1]) * math.log2(V)
    assert head["bits"] == pytest.approx(per_slice[:3].sum() + terminal * 3 * cfg.seq_len, rel=1e-12)
    assert r["bits"] == pytest.approx(per_slice.sum() + terminal * val.size, rel=1e-12)


# ---------------------------------------------------------------- determinism

def test_same_seed_same_bits_other_seed_other_bits():
    p = zipf_unigram()
    model = NeighbourDenoiser()
    cfg = small_cfg(elbo_steps=8)
    val = synthetic_val(4 * cfg.seq_len, p)
    table = synthetic_byte_table()
    a = evaluate(model, val, table, cfg, steps=8, num_seqs=0, seed=5, device=CPU)
    b = evaluate(model, val, table, cfg, steps=8, num_seqs=0, seed=5, device=CPU)
    c = evaluate(model, val, table, cfg, steps=8, num_seqs=0, seed=6, device=CPU)
    for mode in ("strict", "anchored"):
        assert a[mode]["bits"] == b[mode]["bits"]
        assert a[mode]["bits"] != c[mode]["bits"]


@pytest.mark.parametrize("batch_rows", [1, 5, 8, 13, 64])
def test_bits_do_not_depend_on_eval_batch_rows(batch_rows):
    """Mask draws are seeded per (seed, slice), so how jobs are batched never changes them."""
    p = zipf_unigram()
    model = NeighbourDenoiser()
    table = synthetic_byte_table()
    val = synthetic_val(4 * 64 + 20, p)
    slices = make_slices(val, 64, 0, table, PAD)
    ref = elbo_bits(model, slices, "strict", 8, 1e-3, V, 3, 32, CPU)
    got = elbo_bits(model, slices, "strict", 8, 1e-3, V, 3, batch_rows, CPU)
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=0)
    # through evaluate too, and in anchored mode
    cfg_a, cfg_b = small_cfg(eval_batch_rows=32, elbo_steps=8), small_cfg(eval_batch_rows=batch_rows, elbo_steps=8)
    ra = evaluate(model, val, table, cfg_a, steps=8, num_seqs=0, seed=3, device=CPU)
    rb = evaluate(model, val, table, cfg_b, steps=8, num_seqs=0, seed=3, device=CPU)
    for mode in ("strict", "anchored"):
        assert rb[mode]["bits"] == pytest.approx(ra[mode]["bits"], rel=1e-9)


def test_slice_subset_keeps_its_mask_draws():
    """Evaluating slices 2..3 alone gives the same per-slice bits as inside the full run."""
    model = NeighbourDenoiser()
    table = synthetic_byte_table()
    slices = make_slices(synthetic_val(5 * 64, zipf_unigram()), 64, 0, table, PAD)
    full = elbo_bits(model, slices, "strict", 6, 1e-3, V, 11, 7, CPU)
    part = elbo_bits(model, slices.subset(slice(2, 4)), "strict", 6, 1e-3, V, 11, 7, CPU)
    np.testing.assert_allclose(part, full[2:4], rtol=1e-9, atol=0)


def test_real_model_bits_are_batch_invariant():
    """The real transformer: batching changes only float rounding, not the masks."""
    torch.manual_seed(0)
    cfg = small_cfg(elbo_steps=4)
    model = Transformer(cfg)
    nn.init.normal_(model.head.weight, std=0.5)  # non-uniform, context-dependent predictions
    val = synthetic_val(3 * cfg.seq_len, zipf_unigram())
    slices = make_slices(val, cfg.seq_len, 0, synthetic_byte_table(), cfg.tokens.pad)
    a = elbo_bits(model.eval(), slices, "strict", 4, cfg.noise_eps, V, 0, 12, CPU)
    b = elbo_bits(model, slices, "strict", 4, cfg.noise_eps, V, 0, 5, CPU)
    c = elbo_bits(model, slices, "strict", 4, cfg.noise_eps, V, 1, 12, CPU)
    np.testing.assert_allclose(b, a, rtol=1e-5)
    assert np.abs(c - a).max() > 1e-3 * np.abs(a).max()  # a different seed is a different draw


# ---------------------------------------------------------------- the uniform model

def test_fresh_model_is_uniform_and_scores_log2_vocab_bits():
    """MDLM at initialization predicts uniformly (zero head): every masked token costs exactly
    log2(1024) = 10 bits, so bits = 10 * sum_k w_k * (masked count at step k) + alpha_T * 10 * n,
    whose expectation is (1 - alpha_T) * 10 + alpha_T * 10 = 10 bits per token."""
    torch.manual_seed(0)
    steps, seed = 16, 4
    cfg = small_cfg(elbo_steps=steps)
    model = Transformer(cfg)
    x_t = torch.randint(0, V + 2, (3, cfg.seq_len))
    nll = masked_nll(model(x_t, torch.tensor([0.0, 1.0, 5.0])), x_t.clamp(max=V - 1), Tokens(V))
    torch.testing.assert_close(nll, torch.full_like(nll, math.log(V)), rtol=1e-6, atol=0)

    val = synthetic_val(8 * cfg.seq_len - 30, zipf_unigram())
    results = evaluate(model, val, synthetic_byte_table(), cfg, steps=steps, num_seqs=0, seed=seed,
                       device=CPU)
    a = elbo_grid(steps, cfg.noise_eps)
    w = reveal_weights(steps, cfg.noise_eps)
    slices = make_slices(val, cfg.seq_len, 0, synthetic_byte_table(), cfg.tokens.pad)
    for mode, r in results.items():
        n = r["tokens"]
        assert n == (val.size if mode == "strict" else int((val != BOS_ID).sum()))
        # the realized weighted mask count: what the bits must be for a uniform model
        scored = torch.from_numpy(slices.tokens != cfg.tokens.pad)
        if mode == "anchored":
            scored &= torch.from_numpy(slices.tokens != BOS_ID)
        weighted = 0.0
        for i in range(len(slices)):
            u = slice_mask_draws(i, steps, cfg.seq_len, seed)
            counts = ((u < (1 - a[1:])[:, None]) & scored[i]).sum(1).double()
            weighted += float((w * counts).sum())
        assert r["bits"] == pytest.approx(10.0 * weighted + 10.0 * float(a[-1]) * n, rel=1e-6)
        # and that is 10 bits/token up to the mask-count noise: Var = n sum_k w_k^2 (1-a_k) a_k
        sd = 10 * math.sqrt(float((w ** 2 * (1 - a[1:]) * a[1:]).sum()) / n)
        assert abs(r["bits_per_token"] - 10.0) < 5 * sd, (mode, r["bits_per_token"], sd)
