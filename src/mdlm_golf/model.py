"""The transformer, and every model kind this project trains: RoPE, QK-norm, ReLU^2 MLP; bidirectional with
adaLN on the noise level (the MDLM denoiser), bidirectional without it (time_cond false), block diffusion
(denoising each block given the clean blocks before it), or causal (the autoregressive yardstick).

Every caller calls every kind the same way, model(x_t, sigma, clean=x0): the kind decides what it reads.
This file and attention.py are the only places that look at the kind to decide how the network runs."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import (AttentionMask, KVCache, LayerCache, attend, block_attention_mask, block_document_ids,
                        cached_attention_mask, document_ids, document_mask)
from .config import Config


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

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [1, T, 1, head_dim / 2] at the given [T] positions."""
        angles = torch.outer(positions.float(), self.inv_freq)
        return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


def per_position(t: torch.Tensor) -> torch.Tensor:
    """A modulation [B, d] (one per row) or [B, T, d] (one per position), broadcastable over [B, T, d]."""
    return t if t.dim() == 3 else t[:, None]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + per_position(scale)) + per_position(shift)


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.model_dim // cfg.num_heads
        self.qkv = nn.Linear(cfg.model_dim, 3 * cfg.model_dim, bias=False)
        self.proj = nn.Linear(cfg.model_dim, cfg.model_dim, bias=False)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                attn_mask: AttentionMask, cache: LayerCache | None = None, store: bool = False) -> torch.Tensor:
        """cache: keys and values of earlier positions to attend to as well (block sampling, AR coding);
        store: append this forward's keys and values to it."""
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, self.head_dim).unbind(2)
        # RMS-normed q and k keep attention logits bounded without a learned temperature
        q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.extend(k, v, store)
        y = attend(q, k, v, attn_mask)
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
                attn_mask: AttentionMask, cache: LayerCache | None = None, store: bool = False) -> torch.Tensor:
        params = self.adaln(cond) if self.adaln is not None else self.modulation.expand(x.size(0), -1)
        shift1, scale1, gate1, shift2, scale2, gate2 = params.chunk(6, dim=-1)
        h = modulate(F.rms_norm(x, (x.size(-1),)), shift1, scale1)
        x = x + per_position(gate1) * self.attn(h, rotary, attn_mask, cache, store)
        h = modulate(F.rms_norm(x, (x.size(-1),)), shift2, scale2)
        return x + per_position(gate2) * self.mlp(h)


class Transformer(nn.Module):
    """The network of every model kind: x_t [B, L] ids (with MASK/PAD), sigma [B], clean x_0 [B, L] ->
    logits [B, L, vocab+2] at x_t's positions.

    Its kind comes from the config: the plain MDLM reads x_t (and sigma); block diffusion
    (cfg.block_size = B > 0) also reads the clean tokens, each block of x_t seeing the clean blocks
    before it; the autoregressive yardstick (cfg.autoregressive) reads x_t as the clean prefix, causally.
    Attention stays inside the documents delimited by the BOS tokens visible in the input (layouts
    docs and packed).
    """

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.embed_rows, cfg.model_dim)
        conditioned = cfg.noise_conditioned
        self.noise = NoiseEmbedding(cfg.cond_dim) if conditioned else None
        self.rotary = Rotary(cfg.model_dim // cfg.num_heads)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.final_adaln = nn.Linear(cfg.cond_dim, 2 * cfg.model_dim) if conditioned else None
        self.final_modulation = None if conditioned else nn.Parameter(torch.zeros(2 * cfg.model_dim))
        self.head = nn.Linear(cfg.model_dim, cfg.embed_rows, bias=False)
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

    def matmul_params(self) -> int:
        """Weights of the per-token matmuls: the attention and MLP Linears of every block, and the head.
        The embedding is a lookup and the adaLN Linears run once per row, so they are left out."""
        return sum(m.weight.numel() for name, m in self.named_modules() if isinstance(m, nn.Linear)
                   and (name.startswith("blocks.") and "adaln" not in name or name == "head"))

    def flops_per_token(self) -> int:
        """Training FLOPs per token, forward and backward (flop_formula says which)."""
        cfg, k = self.cfg, 2 if self.cfg.block_size else 1
        return k * (6 * self.matmul_params() + 12 * cfg.num_layers * cfg.model_dim * cfg.seq_len * k)

    def flop_formula(self) -> str:
        """How flops_per_token counts: 6 N_matmul + 12 n_layers d_model seq_len (the attention scores and
        their values), run at k = 2 positions per token with attention over 2L for block diffusion's
        [x_t ; x_0] forward: k (6 N + 12 n d k L)."""
        if self.cfg.block_size:
            return "2 (6 N_matmul + 12 n_layers d_model 2 seq_len): block diffusion runs [x_t ; x_0]"
        return "6 N_matmul + 12 n_layers d_model seq_len"

    def forward(self, x_t: torch.Tensor, sigma: torch.Tensor | None = None, clean: torch.Tensor | None = None,
                *, doc_ids: torch.Tensor | None = None, flex: bool = False) -> torch.Tensor:
        """Logits [B, L, vocab+2] at x_t [B, L] (ids with MASK/PAD) for noise levels sigma [B].

        clean: the clean tokens x_0 [B, L], which only block diffusion reads (each block of x_t is
        denoised given the clean blocks before it); every caller may pass it. doc_ids [B, L]
        (optional) override the documents read from x_t's visible BOS tokens; flex asks for a
        FlexAttention block mask on CUDA (fast only under torch.compile), else SDPA's.
        """
        if self.cfg.block_size:
            return self.forward_blocks(x_t, sigma, clean, flex)
        cfg = self.cfg
        if doc_ids is None:
            doc_ids = document_ids(x_t, cfg.layout, cfg.tokens.pad)
        attn_mask = document_mask(doc_ids, flex and x_t.is_cuda, cfg.autoregressive, x_t.size(1))
        positions = torch.arange(x_t.size(1), device=x_t.device)
        return self.trunk(x_t, self.condition(sigma), positions, attn_mask)

    def forward_blocks(self, x_t: torch.Tensor, sigma: torch.Tensor | None, clean: torch.Tensor | None,
                       flex: bool = False) -> torch.Tensor:
        """Block diffusion's training and scoring forward: positions 0..L-1 hold x_t, L..2L-1 hold x_0
        at the same RoPE positions; block_attention_mask says who sees whom. Logits of the x_t half."""
        if clean is None or clean.shape != x_t.shape:
            raise ValueError("a block diffusion model needs the clean tokens (clean=x0) shaped like x_t")
        length, cfg = x_t.size(1), self.cfg
        docs = block_document_ids(x_t, clean, cfg.layout, cfg.tokens.pad, cfg.block_size)
        attn_mask = block_attention_mask(docs, length, cfg.block_size, flex and x_t.is_cuda)
        positions = torch.arange(length, device=x_t.device).repeat(2)
        cond = self.condition(sigma)
        if cond is not None:  # the clean half is at noise level 0, whatever the noisy half's
            clean_cond = self.condition(torch.zeros_like(sigma))
            cond = torch.cat([cond[:, None].expand(-1, length, -1), clean_cond[:, None].expand(-1, length, -1)], 1)
        return self.trunk(torch.cat([x_t, clean], 1), cond, positions, attn_mask)[:, :length]

    def new_cache(self) -> KVCache:
        """An empty cache of the clean past, for forward_cached."""
        return KVCache(self.cfg.num_layers)

    def forward_cached(self, x_block: torch.Tensor, sigma: torch.Tensor | None, cache: KVCache,
                       store: bool = False) -> torch.Tensor:
        """Logits of one block [B, n] that sits right after the cache's positions and attends to them
        and to itself (within documents; causally for an AR model; never to PAD). store: the block is
        clean, so append its keys and values to the cache (block sampling stores each finished block
        once at sigma 0; AR coding stores every token as it goes)."""
        cfg, start = self.cfg, cache.length
        positions = torch.arange(start, start + x_block.size(1), device=x_block.device)
        attn_mask, docs = cached_attention_mask(cache, x_block, cfg.layout, cfg.tokens.pad, cfg.autoregressive)
        logits = self.trunk(x_block, self.condition(sigma), positions, attn_mask, cache.layers, store)
        if store:
            cache.append(docs)
        return logits

    def condition(self, sigma: torch.Tensor | None) -> torch.Tensor | None:
        """The noise embedding [B, cond_dim] fed to the adaLN projections, or None (unconditioned)."""
        return F.silu(self.noise(sigma)) if self.noise is not None else None

    def trunk(self, tokens: torch.Tensor, cond: torch.Tensor | None, positions: torch.Tensor,
              attn_mask: AttentionMask, caches: list[LayerCache] | None = None,
              store: bool = False) -> torch.Tensor:
        """Embedding, the blocks and the head: logits [B, T, vocab+2]."""
        x = self.embed(tokens)
        rotary = self.rotary(positions)
        for i, block in enumerate(self.blocks):
            x = block(x, cond, rotary, attn_mask, caches[i] if caches is not None else None, store)
        final = self.final_adaln(cond) if self.final_adaln is not None else self.final_modulation.expand(x.size(0), -1)
        shift, scale = final.chunk(2, dim=-1)
        x = modulate(F.rms_norm(x, (x.size(-1),)), shift, scale)
        return self.head(x)[..., : self.cfg.num_real_rows]
