"""Partial (sub-token) masking, --subtokens l: the digit code, the digit-level loss and ELBO, and the refusals."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from conftest import synthetic_byte_table
from torch import nn

from mdlm_golf.cli import main
from mdlm_golf.coder import compress_tokens
from mdlm_golf.config import BOS_ID, Tokens, build_config
from mdlm_golf.diffusion import draw_noise, elbo_grid, mask_tokens, masked_nll, reveal_weights
from mdlm_golf.eval import evaluate, headline
from mdlm_golf.eval.elbo import elbo_bits, slice_mask_draws
from mdlm_golf.eval.harness import make_slices
from mdlm_golf.model import Transformer
from mdlm_golf.objective import LossModule, objective_for
from mdlm_golf.sampling import generate
from mdlm_golf.subtokens import digit_code

V = 1024
TOK = Tokens(V)


class Unigram(nn.Module):
    """A context-free denoiser: the same token law p at every position, whatever it reads."""

    def __init__(self, p: np.ndarray):
        super().__init__()
        logits = torch.full((V + 2,), 10.0)  # MASK and PAD columns large on purpose: SUBS drops them
        logits[:V] = torch.from_numpy(np.log(p)).float()
        self.register_buffer("logits", logits)
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x_t, sigma, clean=None, doc_ids=None):
        return self.logits.expand(*x_t.shape, -1)


def zipf(seed: int = 0) -> np.ndarray:
    p = 1.0 / np.arange(1, V + 1) ** 1.1
    p = np.random.default_rng(seed).permutation(p)
    return p / p.sum()


@pytest.mark.parametrize("digits, base", [(1, 1024), (2, 32), (3, 11), (5, 4), (10, 2)])
def test_the_digit_code_is_a_bijection_with_distinct_partial_states(digits, base):
    code = digit_code(V, digits)
    assert code.base == base and base ** digits >= V > (base - 1) ** digits
    places = base ** torch.arange(digits - 1, -1, -1)
    assert torch.equal((code.token_digits * places).sum(1), torch.arange(V))  # digits -> the token back
    x0 = torch.randint(0, V, (4, 64), generator=torch.Generator().manual_seed(0))
    none, every = torch.zeros(4, 64, digits, dtype=torch.bool), torch.ones(4, 64, digits, dtype=torch.bool)
    maskable = torch.ones(4, 64, dtype=torch.bool)
    if digits == 1:
        none, every = none[..., 0], every[..., 0]
    assert torch.equal(code.apply(x0, none)[0], x0)  # nothing masked: the tokens themselves
    assert (code.apply(x0, every & maskable[..., None] if digits > 1 else every)[0] == TOK.mask).all()
    # every partial state has an id of its own past PAD, and reads back its digits
    partial = code.state_of[code.state_of > TOK.pad]
    assert torch.equal(partial, torch.arange(TOK.pad + 1, code.num_ids))


def test_one_digit_is_the_token_level_masking_and_loss_exactly():
    code = digit_code(V, 1)
    x0 = torch.randint(4, V, (6, 32), generator=torch.Generator().manual_seed(1))
    p_mask, maskable = torch.rand(6), torch.rand(6, 32) < 0.9
    u = torch.rand(6, 32)
    got, want = code.mask(x0, p_mask, maskable, u), mask_tokens(x0, p_mask, maskable, TOK.mask, u)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    logits = torch.randn(6, 32, V + 2)
    assert torch.equal(code.nll(logits, got[0], x0), masked_nll(logits, x0, TOK))


def brute_force_bits(p: np.ndarray, code, x_t: torch.Tensor, x0: torch.Tensor) -> float:
    """-log2 of every masked digit's marginal, by enumerating the consistent tokens one position at a time."""
    total = 0.0
    for state, truth in zip(code.state_digits[x_t].reshape(-1, code.digits).tolist(), x0.reshape(-1).tolist()):
        visible = [j for j, d in enumerate(state) if d != code.base]
        consistent = [v for v in range(V) if all(code.token_digits[v, j] == state[j] for j in visible)]
        mass = p[consistent].sum()
        for j in (j for j, d in enumerate(state) if d == code.base):
            same = [v for v in consistent if code.token_digits[v, j] == code.token_digits[truth, j]]
            total -= math.log2(p[same].sum() / mass)
    return total


@pytest.mark.parametrize("digits", [2, 3])
def test_the_digit_loss_is_the_masked_digits_marginals(digits):
    """For a context-free token law, each masked digit costs -log2 of its true value's marginal among the
    tokens consistent with the visible digits: the vectorized loss equals a brute-force enumeration."""
    p, code = zipf(2), digit_code(V, digits)
    x0 = torch.randint(4, V, (2, 12), generator=torch.Generator().manual_seed(3))
    x_t, in_loss = code.mask(x0, torch.tensor([0.3, 0.8]), torch.ones_like(x0, dtype=torch.bool),
                             torch.rand(2, 12, digits, generator=torch.Generator().manual_seed(4)))
    nll = code.nll(Unigram(p)(x_t, None).double(), x_t, x0)
    got = torch.where(in_loss, nll, 0.0).sum().item() / math.log(2)
    assert got == pytest.approx(brute_force_bits(p, code, x_t, x0), rel=1e-6)  # float32 log p


@pytest.mark.parametrize("digits", [1, 2, 5, 10])
def test_uniform_predictions_cost_log2_v_bits_per_token(digits):
    """With the uniform law every masked digit costs log2 b exactly, so a slice's ELBO is the reveal
    weights times its masked digits times log2 b; in expectation that is log2 V per token (b^l = V)."""
    cfg = build_config("tiny", environ={}, overrides=dict(subtokens=digits, elbo_steps=8))
    model = Transformer(cfg).eval()  # the zero-initialized head predicts uniformly
    val = np.random.default_rng(5).integers(4, V, size=64 * cfg.seq_len)
    slices = make_slices(val, cfg.seq_len, 0, synthetic_byte_table(), TOK.pad)
    bits = elbo_bits(model, slices, "strict", 8, cfg.noise_eps, V, 7, 32, torch.device("cpu"), digits=digits)
    alphas, weights = elbo_grid(8, cfg.noise_eps)[1:], reveal_weights(8, cfg.noise_eps)
    code = digit_code(V, digits)
    for s in range(3):  # the drawn masks, counted: exact per slice
        u = slice_mask_draws(s, 8, cfg.seq_len, 7, digits=digits)
        masked = (u < (1 - alphas).view(-1, *[1] * (u.dim() - 1))).reshape(8, -1).sum(1).double()
        assert bits[s] == pytest.approx(float((weights * masked).sum()) * math.log2(code.base), rel=1e-6)
    result = evaluate(model, val, synthetic_byte_table(), cfg, num_seqs=0, modes=("strict",))["strict"]
    per_token = result["bits_per_token"]
    assert per_token == pytest.approx(math.log2(V), abs=4 * per_token_stderr(bits, cfg.seq_len))


def per_token_stderr(bits: np.ndarray, seq_len: int) -> float:
    return float(np.std(bits / seq_len, ddof=1) / math.sqrt(bits.size))


def test_a_context_free_denoiser_meets_its_closed_form():
    """E[ELBO] of a context-free law over l = 2 digits: every (step, token, set of masked digits) weighted
    by its probability, each masked digit costing its marginal given the token's visible digits."""
    p, digits, steps = zipf(6), 2, 6
    cfg = build_config("tiny", environ={}, overrides=dict(subtokens=digits, elbo_steps=steps))
    code = digit_code(V, digits)
    val = np.random.default_rng(8).choice(V, size=48 * cfg.seq_len, p=p)
    result = evaluate(Unigram(p), val, synthetic_byte_table(), cfg, num_seqs=0, modes=("strict",),
                      draws=16)["strict"]
    alphas, weights = elbo_grid(steps, cfg.noise_eps)[1:].numpy(), reveal_weights(steps, cfg.noise_eps).numpy()
    counts = np.bincount(val, minlength=V)
    expected = 0.0
    for x in np.flatnonzero(counts):
        for k in range(steps):
            for hidden in itertools.product([False, True], repeat=digits):
                prob = np.prod([(1 - alphas[k]) if h else alphas[k] for h in hidden])
                state = [code.base if h else int(code.token_digits[x, j]) for j, h in enumerate(hidden)]
                expected += counts[x] * weights[k] * prob * digit_costs(p, code, state, x)
    expected += float(elbo_grid(steps, cfg.noise_eps)[-1]) * code.terminal_bits_per_token() * val.size
    assert result["bits"] == pytest.approx(expected, rel=4 * result["bpb_stderr"] / result["bpb"])


def digit_costs(p: np.ndarray, code, state: list[int], x: int) -> float:
    """Bits of token x's masked digits (state: b where masked) under the context-free law p."""
    consistent = np.ones(V, dtype=bool)
    for j, d in enumerate(state):
        if d != code.base:
            consistent &= code.token_digits[:, j].numpy() == d
    total = 0.0
    for j, d in enumerate(state):
        if d == code.base:
            same = consistent & (code.token_digits[:, j].numpy() == int(code.token_digits[x, j]))
            total -= math.log2(p[same].sum() / p[consistent].sum())
    return total


@pytest.mark.parametrize("merge", ["sum", "token", "concat"])
def test_every_merge_trains_through_the_one_loss_module(merge):
    cfg = build_config("tiny", environ={}, overrides=dict(subtokens=5, subtoken_merge=merge))
    torch.manual_seed(0)
    model = Transformer(cfg)
    x0 = torch.randint(4, V, (4, cfg.seq_len), generator=torch.Generator().manual_seed(9))
    x0[:, 0] = BOS_ID
    batch = objective_for(cfg)(x0, draw_noise(4, cfg.seq_len, torch.Generator().manual_seed(1), digits=5), 0)
    assert batch.inputs.max() < digit_code(V, 5).num_ids and (batch.inputs > TOK.pad).any()  # partial states
    nn.init.normal_(model.head.weight, std=0.02)  # the zero head would pass no gradient back to the input
    loss = LossModule(model)(*batch.loss_args())
    loss.backward()
    assert torch.isfinite(loss) and model.digits.table.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("flags, message", [
    (["--subtokens", "0"], "subtokens must be >= 1"),
    (["--subtokens", "11"], "at most log2(vocab_size)"),
    (["--subtokens", "2", "--objective", "ar"], "plain MDLM"),
])
def test_bad_subtoken_settings_are_one_line_errors(tmp_path, capsys, flags, message):
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "R"), "--preset", "tiny", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_planned_decoding_the_coder_and_sampling_refuse_a_sub_token_model():
    cfg = build_config("tiny", environ={}, overrides=dict(subtokens=2))
    model = Transformer(cfg)
    val = np.arange(4, 4 + 2 * cfg.seq_len)
    for call in (lambda: evaluate(model, val, synthetic_byte_table(), cfg, num_seqs=0, method="planned"),
                 lambda: compress_tokens(model, cfg, val),
                 lambda: generate(model, cfg, num=1, length=8, steps=2)):
        with pytest.raises(ValueError, match="does not take a sub-token model"):
            call()


def test_a_sub_token_run_trains_exports_and_scores_its_artifact(prepared_data, tmp_path, capsys):
    """Training, the T-step ELBO over digits, export and the artifact's round trip, through the CLI; the
    commands that do not take a sub-token model yet refuse it in one line."""
    run, artifact = tmp_path / "P", tmp_path / "p.mdlm"
    assert main(["train", "--data", str(prepared_data), "--out", str(run), "--preset", "tiny", "--steps", "8",
                 "--subtokens", "2", "--subtoken-merge", "token", "--eval-num-seqs", "3"]) == 0
    trained = headline_of(run / "eval.json")
    assert "2 sub-token digits" in trained["kind"] and math.isfinite(trained["bpb"])
    assert main(["export", "--run", str(run), "--out", str(artifact), "--quant", "int8", "--compressor", "zlib"]) == 0
    assert main(["eval", "--artifact", str(artifact), "--data", str(prepared_data), "--num-seqs", "3",
                 "--json", str(tmp_path / "a.json")]) == 0
    assert headline_of(tmp_path / "a.json")["bpb"] == pytest.approx(trained["bpb"], abs=0.02)
    capsys.readouterr()
    assert main(["sample", "--run", str(run), "--num", "1", "--length", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sub-token model" in err[0]


def headline_of(path) -> dict:
    return headline(json.loads(path.read_text()))
