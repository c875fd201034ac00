"""The training objectives, chosen once per config: the MDLM ELBO, or next-token cross-entropy (AR).

An objective turns a micro-batch of clean rows and its noise draws into a LossBatch: what the model reads
(x_t, or the rows without their last token), which positions the loss counts with which weight, and how
many positions the batch's loss is normalized by. Masking happens there, once per micro-batch. The loss
itself (LossModule: the model and a weighted cross-entropy) is the same for every kind, so the trainer,
torch.compile and DDP treat them alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from .config import Config, Tokens
from .diffusion import Noise, alpha, draw_noise, elbo_weight, maskable_positions, sigma
from .subtokens import DigitCode, digit_code


@dataclass
class LossBatch:
    """One micro-batch ready for the loss."""

    inputs: torch.Tensor  # [B, L'] ids the model reads: x_t (MDLM) or the clean rows but their last id (AR)
    sigma: torch.Tensor | None  # [B] noise levels the model is conditioned on (None: AR)
    clean: torch.Tensor | None  # [B, L] the clean rows x_0, which block diffusion reads (None: AR)
    targets: torch.Tensor  # [B, L'] the ids to predict at each input position
    in_loss: torch.Tensor  # [B, L'] bool: positions the loss counts (masked ones; scored AR targets)
    row_weight: torch.Tensor  # [B] weight of a row's terms: the ELBO's w(t) = 1/t (MDLM), 1 (AR)
    scored: torch.Tensor  # positions the loss is normalized by (MDLM: maskable ones; AR: scored targets)

    def loss_args(self) -> tuple:
        """LossModule's arguments, in order."""
        return self.inputs, self.sigma, self.clean, self.targets, self.in_loss, self.row_weight


# prepare(x0 [B, L], noise, step) -> LossBatch
Prepare = Callable[..., LossBatch]


def diffusion_batch(x0: torch.Tensor, noise: Noise, step: int | None = None, *, code: DigitCode, eps: float,
                    layout: str, anchor_mask_prob: float = 0.0, flat_until: int = 0) -> LossBatch:
    """The continuous-time MDLM ELBO's batch: each maskable position (each digit of it, for sub-tokens)
    masked with probability 1 - alpha(t), masked positions weighted by w(t) = 1/t (1 while step <
    flat_until, -1 = always: the flat weight), normalized by the maskable positions. Block diffusion uses
    it unchanged: a row's blocks share its time t (an unbiased estimate of the sum of per-block ELBOs)."""
    t = noise.t.to(x0.device)
    maskable = maskable_positions(x0, layout, code.tokens.pad, anchor_mask_prob, noise.anchor_u)
    x_t, masked = code.mask(x0, 1.0 - alpha(t, eps), maskable, noise.mask_u)
    flat = flat_until < 0 or (step is not None and step < flat_until)
    weight = torch.ones_like(t) if flat else elbo_weight(t, eps)
    return LossBatch(x_t, sigma(t, eps), x0, x0, masked, weight, maskable.sum())


def next_token_batch(x0: torch.Tensor, noise: Noise | None = None, step: int | None = None, *,
                     tokens: Tokens) -> LossBatch:
    """Next-token cross-entropy's batch: each row predicts its own next ids; PAD targets (after a
    document in the docs layout) are not scored. The noise draws are not used."""
    inputs, targets = x0[:, :-1], x0[:, 1:]
    scored = targets != tokens.pad
    return LossBatch(inputs, None, None, targets, scored, torch.ones(x0.size(0), device=x0.device), scored.sum())


def loss_name(cfg: Config) -> str:
    """What the training loss a run logs is, in words (a flat weight makes it no longer the ELBO)."""
    if cfg.autoregressive:
        return "next-token cross-entropy"
    if cfg.loss_weight == "elbo":
        return "continuous-time ELBO"
    until = f" for the first {cfg.loss_warmup_steps} steps, then the ELBO" if cfg.loss_warmup_steps else ""
    return f"flat-weighted, every masked token weighs 1{until}; not a bound"


def objective_for(cfg: Config) -> Prepare:
    """The config's training objective, chosen here once: a micro-batch and its noise -> LossBatch."""
    if cfg.autoregressive:
        return partial(next_token_batch, tokens=cfg.tokens)
    flat_until = 0 if cfg.loss_weight == "elbo" else cfg.loss_warmup_steps or -1
    return partial(diffusion_batch, code=digit_code(cfg.vocab_size, cfg.subtokens), eps=cfg.noise_eps,
                   layout=cfg.layout, anchor_mask_prob=cfg.anchor_mask_prob, flat_until=flat_until)


def weighted_nll_sum(logits: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, in_loss: torch.Tensor,
                     row_weight: torch.Tensor, code: DigitCode) -> torch.Tensor:
    """sum over the counted positions of row_weight * -log p(target's masked part | inputs) in nats (SUBS:
    real tokens only; sub-tokens: the masked digits' marginals)."""
    weighted = code.nll(logits, inputs, targets) * row_weight[:, None]
    return torch.where(in_loss, weighted, 0.0).sum()  # 0 * inf would be NaN at positions not counted


class LossModule(torch.nn.Module):
    """The model and its loss as one module: torch.compile fuses the loss into the model's graph (one
    cross-entropy pass over the logits) and DDP wraps a single thing. The same for every model kind."""

    def __init__(self, model: torch.nn.Module, flex: bool = False):
        """flex: build document masks for FlexAttention (worth it only when compiled on CUDA)."""
        super().__init__()
        self.model, self.flex = model, flex
        self.code = digit_code(model.cfg.vocab_size, model.cfg.subtokens)

    def forward(self, inputs: torch.Tensor, noise_level: torch.Tensor | None, clean: torch.Tensor | None,
                targets: torch.Tensor, in_loss: torch.Tensor, row_weight: torch.Tensor) -> torch.Tensor:
        """The micro-batch's weighted sum of loss terms (LossBatch.loss_args())."""
        logits = self.model(inputs, noise_level, clean, flex=self.flex)
        return weighted_nll_sum(logits, inputs, targets, in_loss, row_weight, self.code)


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar: ELBO estimate in nats per scored token of this batch
    weighted_sum: torch.Tensor  # scalar: sum over masked positions of w(t) * -log p(x0 | x_t)
    scored: torch.Tensor  # number of scored positions (a tensor: no host sync)
    masked: torch.Tensor  # number of masked positions


def diffusion_loss(model, x0: torch.Tensor, tokens: Tokens, eps: float, layout: str,
                   noise: Noise | torch.Generator, anchor_mask_prob: float = 0.0) -> LossOutput:
    """The MDLM loss of one batch for any denoiser model(x_t, sigma, clean): E_t[w(t) * sum_masked
    -log p(x0 | x_t)] / scored tokens, w = 1/t. `noise` is the batch's pre-drawn Noise or a generator."""
    if isinstance(noise, torch.Generator):
        noise = draw_noise(x0.size(0), x0.size(1), noise)
    code = digit_code(tokens.vocab_size, 1)
    batch = diffusion_batch(x0, noise, code=code, eps=eps, layout=layout, anchor_mask_prob=anchor_mask_prob)
    logits = model(batch.inputs, batch.sigma, batch.clean)
    weighted_sum = weighted_nll_sum(logits, batch.inputs, batch.targets, batch.in_loss, batch.row_weight, code)
    return LossOutput(weighted_sum / batch.scored.clamp(min=1), weighted_sum, batch.scored, batch.in_loss.sum())
