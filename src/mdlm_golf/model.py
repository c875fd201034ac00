"""The transformer: RoPE, QK-norm, ReLU^2 MLP; bidirectional with adaLN on the noise level (the MDLM
denoiser), bidirectional without it (time_cond false), or causal (the autoregressive yardstick)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import BOS_ID, Config

try:  # FlexAttention: torch >= 2.5; without it document masking falls back to an SDPA mask
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - old torch
    BlockMask = create_block_mask = flex_attention = None


def sinusoidal_embedding(sigma: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """[B] noise levels -> [B, dim] sin/cos features (as in DiT / MDLM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=sigma.device) / half)
    args = sigma.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class NoiseEmbedding(nn.Module):
    def __init__(self, cond_dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(sigma, self.freq_dim))


class Rotary(nn.Module):
    def __init__(self, head_dim: int, base: float = 10_000.0):
        super().__init__()
        self.register_buffer("inv_freq", base ** (-torch.arange(0, head_dim, 2).float() / head_dim),
                             persistent=False)

    def forward(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        angles = torch.outer(torch.arange(length, device=device).float(), self.inv_freq)
        return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


AttentionMask = torch.Tensor | BlockMask | None  # bool [B, 1, L, L] for SDPA, or a FlexAttention BlockMask


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """Bidirectional attention, restricted by the mask: FlexAttention for a BlockMask, else SDPA."""
    if BlockMask is not None and isinstance(mask, BlockMask):
        return flex_attention(q, k, v, block_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def document_ids(x: torch.Tensor, layout: str, pad_id: int) -> torch.Tensor | None:
    """Per-position document number from the BOS tokens *visible in x* (PAD -1), or None (stream).

    Computed from the model's input, never from the clean tokens: a masked BOS merges its two
    documents, so attention cannot reveal where a hidden boundary was, and training, evaluation and
    sampling all see the same rule.
    """
    if layout == "stream":
        return None
    ids = torch.cumsum(x == BOS_ID, dim=1)
    return torch.where(x == pad_id, -1, ids)


def document_mask(doc_ids: torch.Tensor | None, use_flex: bool, causal: bool = False,
                  length: int = 0) -> AttentionMask:
    """Attention only between positions of the same document (and, if causal, to earlier ones).

    With FlexAttention (CUDA) fully masked blocks are skipped, so packed rows cost what their
    documents cost; the SDPA fallback (CPU) materializes the [B, 1, L, L] boolean mask and lets
    PAD attend to PAD (an all-masked row would give NaN there; PAD outputs are never scored).
    """
    if doc_ids is None and not causal:
        return None
    if use_flex and BlockMask is not None and doc_ids is not None:
        def same_document(b, h, q_idx, kv_idx):  # PAD (-1) attends nowhere: its blocks are skipped
            keep = (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (doc_ids[b, kv_idx] >= 0)
            return keep & (kv_idx <= q_idx) if causal else keep

        batch, length = doc_ids.shape
        return create_block_mask(same_document, batch, None, length, length, device=doc_ids.device)
    mask = None if doc_ids is None else (doc_ids[:, :, None] == doc_ids[:, None, :]).unsqueeze(1)
    if causal:
        length = doc_ids.size(1) if doc_ids is not None else length
        device = doc_ids.device if doc_ids is not None else None
        lower = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        mask = lower if mask is None else mask & lower
    return mask


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.model_dim // cfg.num_heads
        self.qkv = nn.Linear(cfg.model_dim, 3 * cfg.model_dim, bias=False)
        self.proj = nn.Linear(cfg.model_dim, cfg.model_dim, bias=False)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                attn_mask: AttentionMask) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, self.head_dim).unbind(2)
        # RMS-normed q and k keep attention logits bounded without a learned temperature
        q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        y = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask)
        return self.proj(y.transpose(1, 2).reshape(batch, length, dim))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.up = nn.Linear(cfg.model_dim, cfg.mlp_mult * cfg.model_dim, bias=False)
        self.down = nn.Linear(cfg.mlp_mult * cfg.model_dim, cfg.model_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.relu(self.up(x)).square())


class Block(nn.Module):
    """Pre-norm residual block whose halves are shifted, scaled and gated (adaLN-zero): by a function
    of the noise level when conditioned, else by learned constants (the same init, no noise input)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)
        conditioned = cfg.noise_conditioned
        self.adaln = nn.Linear(cfg.cond_dim, 6 * cfg.model_dim) if conditioned else None
        self.modulation = None if conditioned else nn.Parameter(torch.zeros(6 * cfg.model_dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None, rotary: tuple[torch.Tensor, torch.Tensor],
                attn_mask: AttentionMask) -> torch.Tensor:
        params = self.adaln(cond) if self.adaln is not None else self.modulation.expand(x.size(0), -1)
        shift1, scale1, gate1, shift2, scale2, gate2 = params.chunk(6, dim=-1)
        h = modulate(F.rms_norm(x, (x.size(-1),)), shift1, scale1)
        x = x + gate1[:, None] * self.attn(h, rotary, attn_mask)
        h = modulate(F.rms_norm(x, (x.size(-1),)), shift2, scale2)
        return x + gate2[:, None] * self.mlp(h)


class MDLM(nn.Module):
    """x_t [B, L] token ids (with MASK/PAD) and sigma [B] -> logits [B, L, vocab+2].

    Attention stays inside the documents delimited by the BOS tokens visible in the input
    (layouts docs and packed), and is causal for the autoregressive objective.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.causal = cfg.objective == "ar"
        self.embed = nn.Embedding(cfg.embed_rows, cfg.model_dim)
        conditioned = cfg.noise_conditioned
        self.noise = NoiseEmbedding(cfg.cond_dim) if conditioned else None
        self.rotary = Rotary(cfg.model_dim // cfg.num_heads)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.final_adaln = nn.Linear(cfg.cond_dim, 2 * cfg.model_dim) if conditioned else None
        self.final_modulation = None if conditioned else nn.Parameter(torch.zeros(2 * cfg.model_dim))
        self.head = nn.Linear(cfg.model_dim, cfg.embed_rows, bias=False)
        self.use_flex = False  # set by the trainer when the model is compiled on CUDA
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.embed.weight, std=0.02)
        for module in [*(b.adaln for b in self.blocks), self.final_adaln]:
            if module is not None:  # adaLN-zero: every block starts as the identity
                nn.init.zeros_(module.weight)
                nn.init.zeros_(module.bias)
        for constant in [*(b.modulation for b in self.blocks), self.final_modulation]:
            if constant is not None:  # the same, without a noise input
                nn.init.zeros_(constant)
        nn.init.zeros_(self.head.weight)  # uniform prediction at initialization

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x_t: torch.Tensor, sigma: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """doc_ids [B, L] (optional) override the documents read from x_t's visible BOS tokens."""
        if doc_ids is None:
            doc_ids = document_ids(x_t, self.cfg.layout, self.cfg.pad_id)
        attn_mask = document_mask(doc_ids, self.use_flex and x_t.is_cuda, self.causal, x_t.size(1))
        x = self.embed(x_t)
        cond = F.silu(self.noise(sigma)) if self.noise is not None else None
        rotary = self.rotary(x_t.size(1), x_t.device)
        for block in self.blocks:
            x = block(x, cond, rotary, attn_mask)
        final = self.final_adaln(cond) if self.final_adaln is not None else self.final_modulation.expand(x.size(0), -1)
        shift, scale = final.chunk(2, dim=-1)
        x = modulate(F.rms_norm(x, (x.size(-1),)), shift, scale)
        return self.head(x)[..., : self.cfg.num_real_rows]
