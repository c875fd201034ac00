"""The training objectives behind one module: the MDLM ELBO, or next-token cross-entropy (AR).

Both return (sum of per-token losses, scored positions) for a micro-batch, so the trainer, DDP and
torch.compile treat them alike; the AR model is the same transformer, causal and unconditioned.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from .config import Config, Tokens
from .diffusion import Noise, diffusion_loss, maskable_positions


def ar_targets(x0: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs x[:, :-1], targets x[:, 1:], scored targets): each row predicts its own next tokens;
    PAD targets (after a document in the docs layout) are not scored."""
    inputs, targets = x0[:, :-1], x0[:, 1:]
    return inputs, targets, targets != pad_id


def ar_nll(model: torch.nn.Module, x0: torch.Tensor, pad_id: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token NLL in nats [B, L-1], 0 at unscored targets; scored targets [B, L-1])."""
    inputs, targets, scored = ar_targets(x0, pad_id)
    logits = model(inputs)[..., :vocab_size]
    nll = F.cross_entropy(logits.reshape(-1, vocab_size).float(), targets.clamp(max=vocab_size - 1).reshape(-1),
                          reduction="none").view(targets.shape)
    return torch.where(scored, nll, 0.0), scored


def ar_loss(model: torch.nn.Module, x0: torch.Tensor, pad_id: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token NLL in nats over scored targets, scored targets)."""
    nll, scored = ar_nll(model, x0, pad_id, vocab_size)
    return nll.sum(), scored.sum()


def scored_count(x0: torch.Tensor, cfg: Config, noise: Noise) -> torch.Tensor:
    """Positions a micro-batch's loss is normalized by (before any forward, for the global batch)."""
    if cfg.objective == "ar":
        return ar_targets(x0, cfg.pad_id)[2].sum()
    return maskable_positions(x0, cfg.layout, cfg.pad_id, cfg.anchor_mask_prob, noise.anchor_u).sum()


class Objective(torch.nn.Module):
    """The model and its loss as one module: torch.compile fuses the loss into the model's graph
    (one cross-entropy pass over the logits) and DDP wraps a single thing."""

    def __init__(self, model: torch.nn.Module, cfg: Config, flex: bool = False):
        """flex: build document masks for FlexAttention (worth it only when compiled on CUDA)."""
        super().__init__()
        self.model, self.tokens, self.cfg, self.flex = model, Tokens(cfg.vocab_size), cfg, flex

    def forward(self, x0: torch.Tensor, t: torch.Tensor, mask_u: torch.Tensor,
                anchor_u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of the micro-batch's loss terms, scored positions); AR ignores the noise draws."""
        cfg, model = self.cfg, partial(self.model, flex=self.flex)
        if cfg.objective == "ar":
            return ar_loss(model, x0, cfg.pad_id, cfg.vocab_size)
        out = diffusion_loss(model, x0, self.tokens, cfg.noise_eps, cfg.layout,
                             Noise(t, mask_u, anchor_u), cfg.anchor_mask_prob, cfg.blockwise)
        return out.weighted_sum, out.scored
