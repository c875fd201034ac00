"""The absorbing-mask diffusion pieces: schedule, masking, SUBS, and the training loss as an ELBO."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import mdlm_golf.objective
from mdlm_golf import diffusion
from mdlm_golf.config import BOS_ID
from mdlm_golf.diffusion import (
    Tokens,
    alpha,
    antithetic_times,
    elbo_weight,
    mask_tokens,
    maskable_positions,
    masked_nll,
    sigma,
    stratified_times,
    subs_log_probs,
)
from mdlm_golf.objective import diffusion_loss

V = 1024
TOK = Tokens(V)
MASK, PAD = TOK.mask, TOK.pad


def zipf_unigram(seed: int = 0, vocab: int = V) -> np.ndarray:
    """A full-support, skewed unigram distribution over the real tokens (float64)."""
    rng = np.random.default_rng(seed)
    p = 1.0 / (np.arange(vocab) + 10.0) ** 1.1
    p = p[rng.permutation(vocab)]
    return p / p.sum()


class UnigramDenoiser(nn.Module):
    """Context-free denoiser: fixed logits log p at every position, whatever x_t and sigma are.

    The MASK and PAD columns get a large logit on purpose: SUBS must suppress them.
    """

    def __init__(self, p: np.ndarray, special_logit: float = 10.0):
        super().__init__()
        logits = torch.full((p.size + 2,), special_logit, dtype=torch.float32)
        logits[: p.size] = torch.from_numpy(np.log(p)).float()
        self.register_buffer("logits", logits)
        self.dummy = nn.Parameter(torch.zeros(()))  # so next(model.parameters()) works

    def forward(self, x_t: torch.Tensor, sigma: torch.Tensor, clean=None, doc_ids=None) -> torch.Tensor:
        return self.logits.expand(*x_t.shape, -1)


class RecordingDenoiser(nn.Module):
    """Per-position logits that depend on the input token (table[x_t]) and on sigma; records its inputs.

    poison_pad=True overwrites the logits at PAD positions with large random values.
    """

    def __init__(self, seed: int = 0, poison_pad: bool = False):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("table", torch.randn(V + 2, V + 2, generator=gen) * 2.0)
        self.register_buffer("slope", torch.randn(V + 2, generator=gen))
        self.poison_pad = poison_pad
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x_t: torch.Tensor, sigma: torch.Tensor, clean=None, doc_ids=None) -> torch.Tensor:
        self.calls.append((x_t.clone(), sigma.clone()))
        logits = self.table[x_t] + sigma.float()[:, None, None] * self.slope
        if self.poison_pad:
            noise = torch.randn(logits.shape, generator=torch.Generator().manual_seed(99)) * 1e4
            logits = torch.where((x_t == PAD)[..., None], noise, logits)
        return logits


def docs_batch(rows: int, length: int, seed: int, p: np.ndarray | None = None) -> torch.Tensor:
    """docs-layout rows: BOS, then real tokens (never BOS), then PAD after a random document end.

    Some rows contain a second document (another BOS) before the PAD tail.
    """
    rng = np.random.default_rng(seed)
    if p is None:
        body = rng.integers(2, V, size=(rows, length))
    else:
        q = p.copy()
        q[BOS_ID] = 0.0
        body = rng.choice(V, size=(rows, length), p=q / q.sum())
    x = body.astype(np.int64)
    x[:, 0] = BOS_ID
    ends = rng.integers(length // 4, length + 1, size=rows)
    for r in range(rows):
        if r % 3 == 0 and ends[r] > 8:
            x[r, ends[r] // 2] = BOS_ID
        x[r, ends[r]:] = PAD
    return torch.from_numpy(x)


# ---------------------------------------------------------------- schedule

@pytest.mark.parametrize("eps", [1e-3, 0.05, 0.3])
def test_schedule_endpoints_sigma_and_weight(eps):
    t = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
    a = alpha(t, eps)
    assert a[0].item() == 1.0
    assert a[-1].item() == pytest.approx(eps, rel=1e-12)
    assert torch.all(a[1:] < a[:-1])  # strictly decreasing
    torch.testing.assert_close(sigma(t, eps), -torch.log(a), rtol=0, atol=0)
    assert sigma(t, eps)[0].item() == 0.0
    inner = t[1:]
    w = elbo_weight(inner, eps)
    torch.testing.assert_close(w, 1.0 / inner, rtol=1e-12, atol=0)
    torch.testing.assert_close(w, (1 - eps) / (1 - alpha(inner, eps)), rtol=1e-12, atol=0)


@pytest.mark.parametrize("eps", [1e-3, 0.3])
def test_elbo_weight_integrates_to_one_minus_eps_and_dsigma_dt_does_not(eps):
    """Per masked-able token, E_t[(1 - alpha(t)) w(t)] is the coefficient of the NLL in the loss.

    The ELBO needs it to be 1 - alpha(1) = 1 - eps.  dsigma/dt = (1 - eps) / alpha(t) instead gives
    -(1 - eps) - ln(eps): about 5.9 at eps = 1e-3, i.e. a loss ~6x the bound.
    """
    c = 1.0 - eps
    n = 200_000
    t = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # midpoint rule on [0, 1]
    p_mask = 1.0 - alpha(t, eps)
    right = (p_mask * elbo_weight(t, eps)).mean().item()
    wrong = (p_mask * c / alpha(t, eps)).mean().item()
    assert right == pytest.approx(c, rel=1e-9)
    assert wrong == pytest.approx(-c - math.log(eps), rel=1e-4)
    assert wrong > 1.5 * right if eps < 0.1 else abs(wrong - right) > 0.05


# ---------------------------------------------------------------- antithetic times

@pytest.mark.parametrize("n", [2, 8, 64, 1000])
def test_antithetic_times_pairs_sum_to_one(n):
    t = antithetic_times(n, torch.Generator().manual_seed(3))
    assert t.shape == (n,)
    assert torch.all((t >= 0) & (t <= 1))
    half = n // 2
    torch.testing.assert_close(t[:half] + t[half:], torch.ones(half), rtol=0, atol=1e-6)
    assert t[:half].unique().numel() == half  # the first half really is random, not a constant


def test_antithetic_times_odd_and_deterministic():
    t = antithetic_times(7, torch.Generator().manual_seed(5))
    assert t.shape == (7,)
    assert torch.all((t >= 0) & (t <= 1))
    a = antithetic_times(64, torch.Generator().manual_seed(11))
    b = antithetic_times(64, torch.Generator().manual_seed(11))
    c = antithetic_times(64, torch.Generator().manual_seed(12))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # drawing from one generator advances it: consecutive draws differ
    g = torch.Generator().manual_seed(11)
    assert not torch.equal(antithetic_times(64, g), antithetic_times(64, g))


def test_antithetic_times_are_uniform():
    t = antithetic_times(20_000, torch.Generator().manual_seed(0))
    counts = torch.histc(t, bins=10, min=0.0, max=1.0)
    assert torch.all((counts - 2000).abs() < 200)  # ~4.7 binomial SDs


@pytest.mark.parametrize("n", [1, 7, 16, 64])
def test_stratified_times_put_one_time_in_each_stratum(n):
    t = stratified_times(n, torch.Generator().manual_seed(4))
    assert t.shape == (n,)
    strata = torch.floor(t * n).long()
    assert torch.equal(strata, torch.arange(n))  # row i in [i/n, (i+1)/n)
    torch.testing.assert_close(t - torch.arange(n) / n, torch.full((n,), float(t[0])), rtol=0, atol=1e-6)
    assert not torch.equal(t, stratified_times(n, torch.Generator().manual_seed(5)))


def test_stratified_times_are_uniform_over_draws():
    """Each row's time is uniform over the draws (so the ELBO estimate stays unbiased)."""
    g = torch.Generator().manual_seed(0)
    t = torch.stack([stratified_times(4, g) for _ in range(4000)]).flatten()
    counts = torch.histc(t, bins=8, min=0.0, max=1.0)
    assert torch.all((counts - 2000).abs() < 200)


def test_every_time_sampling_in_the_config_has_a_sampler():
    from mdlm_golf.config import TIME_SAMPLINGS

    assert set(diffusion.TIME_SAMPLERS) == set(TIME_SAMPLINGS)
    from mdlm_golf.config import build_config
    from mdlm_golf.train.loop import step_noise

    cfg = build_config("tiny", environ={}, overrides={"time_sampling": "stratified"})
    noise = step_noise(cfg, step=3, world_size=2, device=torch.device("cpu"))  # the trainer's draws
    rows = cfg.batch_rows * cfg.grad_accum * 2
    assert torch.equal(torch.floor(noise.t * rows).long(), torch.arange(rows))


# ---------------------------------------------------------------- masking

def test_docs_layout_never_masks_bos_or_pad():
    x0 = docs_batch(16, 64, seed=1)
    gen = torch.Generator().manual_seed(0)
    ones = torch.ones(x0.size(0))
    is_special = (x0 == BOS_ID) | (x0 == PAD)
    for _ in range(50):
        maskable = maskable_positions(x0, "docs", PAD)
        assert torch.equal(maskable, ~is_special)
        x_t, masked = mask_tokens(x0, ones, maskable, MASK, gen)
        assert torch.equal(masked, ~is_special)  # p_mask = 1: everything maskable is masked
        assert torch.all(x_t[is_special] == x0[is_special])
        assert torch.all(x_t[~is_special] == MASK)


def test_stream_layout_masks_bos_but_not_pad():
    x0 = docs_batch(16, 64, seed=2)
    assert (x0 == BOS_ID).sum() > 16
    gen = torch.Generator().manual_seed(0)
    maskable = maskable_positions(x0, "stream", PAD)
    assert torch.equal(maskable, x0 != PAD)
    x_t, masked = mask_tokens(x0, torch.ones(x0.size(0)), maskable, MASK, gen)
    assert torch.all(x_t[x0 == BOS_ID] == MASK)
    assert torch.all(x_t[x0 == PAD] == PAD)
    assert not masked[x0 == PAD].any()


def test_stream_layout_ignores_anchor_mask_prob():
    x0 = docs_batch(8, 64, seed=3)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(maskable_positions(x0, "stream", PAD, 0.5, gen), x0 != PAD)


def test_mask_rate_follows_p_mask_per_row():
    x0 = torch.randint(2, V, (4, 20_000), generator=torch.Generator().manual_seed(0))
    p_mask = torch.tensor([0.0, 0.1, 0.5, 0.9])
    x_t, masked = mask_tokens(x0, p_mask, torch.ones_like(x0, dtype=torch.bool), MASK,
                              torch.Generator().manual_seed(1))
    assert torch.equal(masked, x_t == MASK)
    rate = masked.double().mean(dim=1)
    sd = (p_mask * (1 - p_mask) / x0.size(1)).sqrt().double()
    assert torch.all((rate - p_mask.double()).abs() <= 5 * sd + 1e-12)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_anchor_mask_prob_masks_that_fraction_of_anchors(p):
    x0 = docs_batch(64, 64, seed=4)
    anchors = x0 == BOS_ID
    pad = x0 == PAD
    gen = torch.Generator().manual_seed(7)
    hits = total = 0
    for _ in range(40):
        maskable = maskable_positions(x0, "docs", PAD, p, gen)
        _, masked = mask_tokens(x0, torch.ones(x0.size(0)), maskable, MASK, gen)
        assert not masked[pad].any()
        assert masked[~anchors & ~pad].all()  # ordinary tokens are always maskable
        hits += int(masked[anchors].sum())
        total += int(anchors.sum())
    frac = hits / total
    sd = math.sqrt(p * (1 - p) / total)
    assert abs(frac - p) < 5 * sd


# ---------------------------------------------------------------- SUBS

def test_subs_masked_position_distribution_is_over_real_tokens_only():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 40, V + 2, generator=gen) * 3
    logits[..., MASK] = 50.0  # SUBS must ignore whatever the model puts on MASK / PAD
    logits[..., PAD] = 50.0
    lp = subs_log_probs(logits, TOK)
    assert lp.shape == (3, 40, V)  # MASK and PAD have no column: probability exactly 0
    assert torch.isfinite(lp).all()
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(3, 40), rtol=0, atol=1e-5)
    # the softmax of the real-token logits alone, whatever the model put on MASK and PAD
    torch.testing.assert_close(lp, torch.log_softmax(logits[..., :V], -1))
    assert subs_log_probs(logits, TOK, torch.float64).dtype == torch.float64


def test_masked_nll_equals_subs_log_prob_at_x0_on_masked_positions():
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, V, (4, 50), generator=gen)
    x0[1, -10:] = PAD  # PAD targets must not break the gather
    masked = (torch.rand(x0.shape, generator=gen) < 0.5) & (x0 != PAD)
    logits = torch.randn(4, 50, V + 2, generator=gen) * 2
    logits[..., MASK] = 20.0
    nll = masked_nll(logits, x0, TOK)
    assert nll.shape == x0.shape
    assert torch.isfinite(nll).all()
    lp = subs_log_probs(logits, TOK)
    expected = -lp.gather(-1, x0.clamp(max=V - 1).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(nll[masked], expected[masked], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the training loss

def t_from_sigma(s: torch.Tensor, eps: float) -> torch.Tensor:
    return (1.0 - torch.exp(-s.double())) / (1.0 - eps)


@pytest.mark.parametrize("layout", ["docs", "stream"])
def test_diffusion_loss_scores_exactly_the_masked_non_pad_positions(layout):
    eps = 1e-3
    x0 = docs_batch(12, 48, seed=5)
    model = RecordingDenoiser()
    out = diffusion_loss(model, x0, TOK, eps, layout, torch.Generator().manual_seed(2))
    (x_t, s), = model.calls

    maskable = x0 != PAD
    if layout == "docs":
        maskable &= x0 != BOS_ID
    assert int(out.scored) == int(maskable.sum())
    masked = x_t == MASK
    assert int(out.masked) == int(masked.sum())
    assert not masked[~maskable].any()  # PAD (and anchors in docs) are never masked
    assert torch.equal(x_t[~masked], x0[~masked])  # everything else is left as it was
    assert masked.any() and (maskable & ~masked).any()

    # the loss, recomputed from what the model saw: w(t) * -log softmax_real(logits)[x0] at MASK
    t = t_from_sigma(s, eps)
    logits = model.table[x_t] + s.float()[:, None, None] * model.slope
    nll = -torch.log_softmax(logits[..., :V].double(), -1).gather(
        -1, x0.clamp(max=V - 1).unsqueeze(-1)).squeeze(-1)
    expected = (nll * masked / t[:, None]).sum() / maskable.sum()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("layout", ["docs", "stream"])
def test_diffusion_loss_ignores_logits_at_pad_positions(layout):
    """Whatever the model outputs after the document end (here: +-1e4 noise), the loss is unchanged."""
    eps = 1e-3
    x0 = docs_batch(12, 48, seed=6)
    assert (x0 == PAD).sum() > 50
    clean = diffusion_loss(RecordingDenoiser(), x0, TOK, eps, layout, torch.Generator().manual_seed(4))
    poisoned = diffusion_loss(RecordingDenoiser(poison_pad=True), x0, TOK, eps, layout,
                              torch.Generator().manual_seed(4))
    assert torch.isfinite(poisoned.loss)
    assert poisoned.loss.item() == clean.loss.item()
    assert int(poisoned.scored) == int(clean.scored)


def test_diffusion_loss_scored_count_tracks_the_document_end():
    """Turning the last k document tokens of a row into PAD removes exactly k scored positions."""
    x0 = docs_batch(8, 64, seed=7)
    base = diffusion_loss(RecordingDenoiser(), x0, TOK, 1e-3, "docs", torch.Generator().manual_seed(9))
    shorter = x0.clone()
    doc_end = int((x0[0] != PAD).sum())
    assert int((x0[0, doc_end - 5:doc_end] == BOS_ID).sum()) == 0
    shorter[0, doc_end - 5:doc_end] = PAD
    model = RecordingDenoiser()
    out = diffusion_loss(model, shorter, TOK, 1e-3, "docs", torch.Generator().manual_seed(9))
    assert int(out.scored) == int(base.scored) - 5
    (x_t, _), = model.calls
    assert torch.all(x_t[0, doc_end - 5:] == PAD)


def test_diffusion_loss_anchor_mask_prob_scores_masked_anchors():
    eps = 1e-3
    x0 = docs_batch(32, 32, seed=8)
    n_bos, n_pad = int((x0 == BOS_ID).sum()), int((x0 == PAD).sum())
    full = diffusion_loss(RecordingDenoiser(), x0, TOK, eps, "docs", torch.Generator().manual_seed(0),
                          anchor_mask_prob=1.0)
    assert int(full.scored) == x0.numel() - n_pad  # every anchor maskable
    none = diffusion_loss(RecordingDenoiser(), x0, TOK, eps, "docs", torch.Generator().manual_seed(0),
                          anchor_mask_prob=0.0)
    assert int(none.scored) == x0.numel() - n_pad - n_bos


def test_diffusion_loss_is_deterministic_for_a_generator_seed():
    x0 = docs_batch(8, 32, seed=9)
    a = diffusion_loss(RecordingDenoiser(), x0, TOK, 1e-3, "docs", torch.Generator().manual_seed(1))
    b = diffusion_loss(RecordingDenoiser(), x0, TOK, 1e-3, "docs", torch.Generator().manual_seed(1))
    c = diffusion_loss(RecordingDenoiser(), x0, TOK, 1e-3, "docs", torch.Generator().manual_seed(2))
    assert a.loss.item() == b.loss.item()
    assert a.loss.item() != c.loss.item()


# ---------------------------------------------------------------- the loss is the ELBO

def unigram_loss_samples(p: np.ndarray, eps: float, layout: str, batches: int, rows: int = 32,
                         length: int = 128) -> np.ndarray:
    model = UnigramDenoiser(p)
    gen = torch.Generator().manual_seed(1234)
    rng = np.random.default_rng(5678)
    losses = []
    with torch.no_grad():
        for b in range(batches):
            if layout == "stream":
                x0 = torch.from_numpy(rng.choice(V, size=(rows, length), p=p))
            else:
                x0 = docs_batch(rows, length, seed=int(rng.integers(1 << 31)), p=p)
            losses.append(diffusion_loss(model, x0, TOK, eps, layout, gen).loss.item())
    return np.asarray(losses)


def expected_nll_nats(p: np.ndarray, layout: str) -> float:
    """E[-ln p(x)] over the scored tokens: x ~ p (stream) or x ~ p given x != BOS (docs rows)."""
    q = p.copy()
    if layout == "docs":
        q[BOS_ID] = 0.0
        q /= q.sum()
    return float(-(q * np.log(p)).sum())


@pytest.mark.parametrize("layout, eps", [("docs", 1e-3), ("stream", 0.3)])
def test_loss_of_unigram_model_equals_the_elbo(layout, eps):
    """For a context-free model the continuous-time ELBO is exactly (1 - eps) * E[-ln p(x)].

    Averaged over many mask/time/data draws the training loss must match it within Monte-Carlo
    error: this pins the 1/t weight, the mask rate 1 - alpha(t) and the per-scored-token mean.
    """
    p = zipf_unigram()
    losses = unigram_loss_samples(p, eps, layout, batches=30, rows=64, length=64)
    target = (1.0 - eps) * expected_nll_nats(p, layout)
    se = losses.std(ddof=1) / math.sqrt(losses.size)
    assert se < 0.01 * target  # the check below is sharp to ~4% of the bound
    assert abs(losses.mean() - target) < 4.5 * se, (losses.mean(), target, se)


def test_dsigma_dt_weight_would_not_be_the_elbo(monkeypatch):
    """The same experiment with w = dsigma/dt = (1 - eps) / alpha(t) lands near 5.9x the bound.

    Its variance comes from t near 1 (weights up to 1/eps), so many short rows are drawn.
    """
    eps = 1e-3
    p = zipf_unigram()
    monkeypatch.setattr(mdlm_golf.objective, "elbo_weight", lambda t, e: (1.0 - e) / alpha(t, e))
    losses = unigram_loss_samples(p, eps, "stream", batches=60, rows=256, length=8)
    h = expected_nll_nats(p, "stream")
    se = losses.std(ddof=1) / math.sqrt(losses.size)
    wrong_target = (-(1.0 - eps) - math.log(eps)) * h  # analytic E_t[(1 - alpha) dsigma/dt] * H
    assert abs(losses.mean() - wrong_target) < 4.5 * se, (losses.mean(), wrong_target, se)
    true_elbo = (1.0 - eps) * h
    assert losses.mean() - true_elbo > 10 * se
    assert losses.mean() > 4 * true_elbo
