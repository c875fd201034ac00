"""Absorbing-mask diffusion: log-linear schedule, noise draws, masking, SUBS and the discrete ELBO's grid.

Every random draw takes an explicit torch.Generator so results are reproducible for a seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import BOS_ID, Tokens


# ---------------------------------------------------------------- noise schedule

def alpha(t: torch.Tensor, eps: float) -> torch.Tensor:
    """Probability a token is still visible at time t: 1 - (1 - eps) t."""
    return 1.0 - (1.0 - eps) * t


def sigma(t: torch.Tensor, eps: float) -> torch.Tensor:
    """Total noise -log alpha(t), what the model is conditioned on."""
    return -torch.log(alpha(t, eps))


def elbo_weight(t: torch.Tensor, eps: float) -> torch.Tensor:
    """Weight of the continuous-time ELBO: -alpha'(t) / (1 - alpha(t)) = (dsigma/dt) / expm1(sigma).

    For the log-linear schedule this is (1 - eps) / ((1 - eps) t) = 1 / t. Note that dsigma/dt
    alone, (1 - eps) / alpha(t), is *not* an ELBO weight: it over-counts by 1 / (1 - alpha) and its
    expectation is ~6x the true bound at uniform predictions (tests/test_diffusion.py checks this).
    """
    return (1.0 - eps) / (1.0 - alpha(t, eps)).clamp(min=1e-12)


def antithetic_times(n: int, generator: torch.Generator) -> torch.Tensor:
    """n times in [0, 1) drawn as pairs (u, 1 - u), on the generator's device: halves the variance
    of the t integral."""
    u = torch.rand((n + 1) // 2, generator=generator, device=generator.device)
    return torch.cat([u, 1.0 - u])[:n]


def stratified_times(n: int, generator: torch.Generator) -> torch.Tensor:
    """n times in [0, 1), one in each stratum [i/n, (i+1)/n) from a single shared offset (MDLM's
    low-discrepancy sampler): the batch covers the whole t range every step, whatever its draws."""
    u = torch.rand(1, generator=generator, device=generator.device)
    return (u + torch.arange(n, device=generator.device)) / n


TIME_SAMPLERS = {"antithetic": antithetic_times, "stratified": stratified_times}


# ---------------------------------------------------------------- masking

Uniforms = torch.Tensor | torch.Generator  # pre-drawn uniforms, or a generator to draw them from


def uniforms(shape: torch.Size, source: Uniforms | None, device: torch.device) -> torch.Tensor:
    """U(0,1) draws of `shape`: taken as given, or drawn on the CPU from a seeded generator."""
    if isinstance(source, torch.Tensor):
        return source.to(device)
    return torch.rand(shape, generator=source).to(device)


@dataclass
class Noise:
    """Every random draw of one training batch, so a row's noise never depends on how rows are split."""

    t: torch.Tensor  # [B] diffusion times (antithetic pairs or strata)
    mask_u: torch.Tensor  # [B, L] (or [B, L, digits]) position (digit) masked iff mask_u < 1 - alpha(t)
    anchor_u: torch.Tensor  # [B, L] a BOS anchor is maskable iff anchor_u < anchor_mask_prob

    def rows(self, index: torch.Tensor | slice) -> "Noise":
        return Noise(self.t[index], self.mask_u[index], self.anchor_u[index])


def draw_noise(rows: int, seq_len: int, generator: torch.Generator, time_sampling: str = "antithetic",
               digits: int = 1) -> Noise:
    """All draws of a batch, on the generator's device (a CUDA generator keeps the GPU from waiting);
    time_sampling names one of TIME_SAMPLERS; digits > 1 draws a mask uniform per sub-token digit."""
    device = generator.device
    return Noise(TIME_SAMPLERS[time_sampling](rows, generator),
                 torch.rand(mask_shape(rows, seq_len, digits), generator=generator, device=device),
                 torch.rand(rows, seq_len, generator=generator, device=device))


def mask_shape(rows: int, seq_len: int, digits: int = 1) -> tuple[int, ...]:
    """The shape of a batch's mask uniforms: one per position, or per sub-token digit."""
    return (rows, seq_len) if digits == 1 else (rows, seq_len, digits)


def maskable_positions(x0: torch.Tensor, layout: str, pad_id: int, anchor_mask_prob: float = 0.0,
                       anchor_u: Uniforms | None = None) -> torch.Tensor:
    """Which positions may be masked (and are scored): never PAD; in `docs` no BOS anchors
    (except, with anchor_mask_prob > 0, that fraction of them, so boundaries can be learned)."""
    maskable = x0 != pad_id
    if layout in ("docs", "packed"):
        anchors = x0 == BOS_ID
        if anchor_mask_prob > 0:
            anchors &= uniforms(x0.shape, anchor_u, x0.device) >= anchor_mask_prob
        maskable &= ~anchors
    return maskable


def mask_tokens(x0: torch.Tensor, p_mask: torch.Tensor, maskable: torch.Tensor, mask_id: int,
                mask_u: Uniforms) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each maskable position of row b with probability p_mask[b]; returns (x_t, masked)."""
    masked = (uniforms(x0.shape, mask_u, x0.device) < p_mask[:, None]) & maskable
    return torch.where(masked, torch.full_like(x0, mask_id), x0), masked


# ---------------------------------------------------------------- SUBS parameterization

# SUBS (Sahoo et al. 2024): a visible token is copied (it costs 0 bits and is never re-predicted), and
# at a masked position MASK and PAD are never predicted. The loss, the ELBO, planned decoding, the coder
# and the samplers all take the masked-position distribution from subs_logits, so they agree exactly.

def subs_logits(logits: torch.Tensor, tokens: Tokens, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The logits of the denoiser's distribution at a masked position: the real tokens' columns only
    (dropping MASK and PAD gives them probability exactly 0), in `dtype`."""
    return logits[..., : tokens.vocab_size].to(dtype)


def subs_log_probs(logits: torch.Tensor, tokens: Tokens, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """log p(token | x_t) over the real tokens at a masked position, [..., vocab_size]."""
    return F.log_softmax(subs_logits(logits, tokens, dtype), dim=-1)


def masked_nll(logits: torch.Tensor, x0: torch.Tensor, tokens: Tokens) -> torch.Tensor:
    """-log p(x0 | x_t) in nats at every position under SUBS, in one fused cross-entropy.

    Visible positions cost 0 under SUBS and callers multiply by the mask. PAD targets are never
    scored, so they are clamped into range only to keep the gather valid.
    """
    vocab = tokens.vocab_size
    nll = F.cross_entropy(subs_logits(logits, tokens).reshape(-1, vocab), x0.clamp(max=vocab - 1).reshape(-1),
                          reduction="none")
    return nll.view(x0.shape)


# ---------------------------------------------------------------- discrete-time ELBO

GRIDS = ("linear", "cosine", "geometric")


def elbo_grid(steps: int, eps: float, grid: str = "linear") -> torch.Tensor:
    """alpha_k, k = 0..T, from alpha_0 = 1 to alpha_T = eps (float64). Any monotone grid gives a valid bound.

    linear     uniform in t; for the log-linear schedule that is also uniform in alpha
    cosine     alpha = eps + (1 - eps) cos(pi/2 u): fine steps while few tokens are masked
    geometric  alpha = eps ** u, uniform in sigma = -log alpha: fine steps while few are visible
    """
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    if grid == "linear":
        return alpha(u, eps)
    if grid == "cosine":
        return (eps + (1.0 - eps) * torch.cos(0.5 * math.pi * u)).clamp(min=eps)
    if grid == "geometric":
        return eps ** u
    raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")


def reveal_weights(steps: int, eps: float, grid: str = "linear") -> torch.Tensor:
    """(alpha_{k-1} - alpha_k) / (1 - alpha_k) for k = 1..T: the chance a masked token is revealed at step k."""
    a = elbo_grid(steps, eps, grid)
    return (a[:-1] - a[1:]) / (1.0 - a[1:])


def terminal_bits(steps: int, eps: float, bits_per_token: float, grid: str = "linear") -> float:
    """Bits per scored token for what is still visible at t = 1, coded uniformly: alpha_T bits_per_token
    (log2 V for a token, l log2 b for l digits of base b)."""
    return float(elbo_grid(steps, eps, grid)[-1]) * bits_per_token
