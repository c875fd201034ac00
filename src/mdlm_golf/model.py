"""The transformer, and every model kind this project trains: RoPE, QK-norm, ReLU^2 MLP; bidirectional with
adaLN on the noise level (the MDLM denoiser), bidirectional without it (time_cond false), block diffusion
(denoising each block given the clean blocks before it: one [x_t ; x_0] forward, or an encoder of the
clean tokens and a small decoder of the noisy ones), or causal (the autoregressive yardstick).

Every caller calls every kind the same way, model(x_t, sigma, clean=x0): the kind decides what it reads.
This file and attention.py are the only places that look at the kind to decide how the network runs."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import (AttentionMask, KVCache, LayerCache, attend, block_attention_mask, block_document_ids,
                        cached_attention_mask, document_ids, document_mask, encoder_decoder_masks)
from .config import Config
from .subtokens import digit_code


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

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], attn_mask: AttentionMask,
                cache: LayerCache | None = None, store: bool = False,
                context: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """cache: keys and values of earlier positions to attend to as well (block sampling, AR coding);
        store: append this forward's keys and values to it. context: keys and values of positions this
        layer reads but does not update (the encoder's features, for a decoder layer), after x's own."""
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, self.head_dim).unbind(2)
        # RMS-normed q and k keep attention logits bounded without a learned temperature
        q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if context is not None:
            k, v = torch.cat([k, context[0]], 2), torch.cat([v, context[1]], 2)
        if cache is not None:
            k, v = cache.extend(k, v, store)
        y = attend(q, k, v, attn_mask)
        return self.proj(y.transpose(1, 2).reshape(batch, length, dim))

    def keys_values(self, h: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, H, T, head_dim] of features h [B, T, d] at the rotary's positions, through
        this layer's projections (the query rows of qkv are not computed)."""
        batch, length, dim = h.shape
        k, v = F.linear(h, self.qkv.weight[dim:]).view(batch, length, 2, self.num_heads, self.head_dim).unbind(2)
        k = apply_rotary(F.rms_norm(k, (self.head_dim,)), *rotary)
        return k.transpose(1, 2), v.transpose(1, 2)


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
                attn_mask: AttentionMask, cache: LayerCache | None = None, store: bool = False,
                context: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        params = self.adaln(cond) if self.adaln is not None else self.modulation.expand(x.size(0), -1)
        shift1, scale1, gate1, shift2, scale2, gate2 = params.chunk(6, dim=-1)
        h = modulate(F.rms_norm(x, (x.size(-1),)), shift1, scale1)
        x = x + per_position(gate1) * self.attn(h, rotary, attn_mask, cache, store, context)
        h = modulate(F.rms_norm(x, (x.size(-1),)), shift2, scale2)
        return x + per_position(gate2) * self.mlp(h)


class DigitEmbedding(nn.Module):
    """A sub-token model's input embedding of every input id: a token, MASK, PAD or a partly masked token.

    merge "sum": the sum of each digit slot's embedding of its value (or of its being masked); "token": the
    same, but a fully visible token reads its own row of the token embedding; "concat": narrower slot
    embeddings, concatenated and merged by a Linear (learned, as MDM-Prime's). PAD reads its token row.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        code = digit_code(cfg.vocab_size, cfg.subtokens)
        self.merge, self.slots, self.pad = cfg.subtoken_merge, code.digits * (code.base + 1), cfg.tokens.pad
        self.vocab = cfg.vocab_size
        width = cfg.model_dim // code.digits if self.merge == "concat" else cfg.model_dim
        self.table = nn.Embedding(self.slots, width)
        self.mix = nn.Linear(code.digits * width, cfg.model_dim, bias=False) if self.merge == "concat" else None
        # The code's tables live on the CPU; built on the same device so that a model built under
        # torch.device("meta") (shape checks, FLOP counts) adds like to like.
        offsets = torch.arange(code.digits, device=code.state_digits.device) * (code.base + 1)
        self.register_buffer("rows", code.state_digits + offsets, persistent=False)  # [num ids, l]

    def forward(self, ids: torch.Tensor, token_embed: nn.Embedding) -> torch.Tensor:
        slots = self.table(self.rows[ids])  # [B, T, l, width]
        x = self.mix(slots.flatten(-2)) if self.mix is not None else slots.sum(-2)
        own = ids == self.pad
        if self.merge == "token":
            own |= ids < self.vocab
        return torch.where(own[..., None], token_embed(ids.clamp(max=self.pad)), x)


def parameter_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """The shape of every weight of a config's model, built on the meta device: nothing is allocated, so
    a config read from a file can be checked against the tensors the file holds before the model exists."""
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in Transformer(cfg).state_dict().items()}


class Transformer(nn.Module):
    """The network of every model kind: x_t [B, L] ids (with MASK/PAD), sigma [B], clean x_0 [B, L] ->
    logits [B, L, vocab+2] at x_t's positions.

    Its kind comes from the config: the plain MDLM reads x_t (and sigma); block diffusion
    (cfg.block_size = B > 0) also reads the clean tokens, each block of x_t seeing the clean blocks
    before it, in one forward over [x_t ; x_0] or (cfg.decoder_layers = K > 0) with the layers as an
    encoder of x_0 and K decoder layers over x_t; the autoregressive yardstick (cfg.autoregressive)
    reads x_t as the clean prefix, causally. Attention stays inside the documents delimited by the BOS
    tokens visible in the input (layouts docs and packed).
    """

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.embed_rows, cfg.model_dim)
        conditioned = cfg.noise_conditioned
        self.noise = NoiseEmbedding(cfg.cond_dim) if conditioned else None
        self.rotary = Rotary(cfg.model_dim // cfg.num_heads)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        own_decoder = cfg.encoder_decoder and not cfg.decoder_tied
        self.decoder = nn.ModuleList(Block(cfg) for _ in range(cfg.decoder_layers)) if own_decoder else None
        self.final_adaln = nn.Linear(cfg.cond_dim, 2 * cfg.model_dim) if conditioned else None
        self.final_modulation = None if conditioned else nn.Parameter(torch.zeros(2 * cfg.model_dim))
        self.head = nn.Linear(cfg.model_dim, cfg.embed_rows, bias=False)
        self.digits = DigitEmbedding(cfg) if cfg.subtokens > 1 else None
        self.reset_parameters()

    @property
    def decoder_blocks(self) -> list[Block]:
        """The encoder-decoder's decoder layers: its own, or the top decoder_layers encoder layers (tied)."""
        if self.decoder is not None:
            return list(self.decoder)
        return list(self.blocks[len(self.blocks) - self.cfg.decoder_layers:]) if self.cfg.decoder_layers else []

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.embed.weight, std=std)
        if self.digits is not None:
            nn.init.normal_(self.digits.table.weight, std=std)
        blocks = [*self.blocks, *(self.decoder or [])]
        for module in [*(b.adaln for b in blocks), self.final_adaln]:
            if module is not None:  # adaLN-zero: every block starts as the identity
                nn.init.zeros_(module.weight)
                nn.init.zeros_(module.bias)
        for constant in [*(b.modulation for b in blocks), self.final_modulation]:
            if constant is not None:  # the same, without a noise input
                nn.init.zeros_(constant)
        nn.init.zeros_(self.head.weight)  # uniform prediction at initialization

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def matmul_params(self) -> int:
        """Weights of the per-token matmuls: the attention and MLP Linears of every block, and the head.
        The embedding is a lookup and the adaLN Linears run once per row, so they are left out."""
        return sum(m.weight.numel() for name, m in self.named_modules() if isinstance(m, nn.Linear)
                   and (name.startswith(("blocks.", "decoder.")) and "adaln" not in name or name == "head"))

    def flops_per_token(self) -> int:
        """Training FLOPs per token, forward and backward: 6 per matmul weight each position runs through
        and 12 d_model per layer and key a query may see (at most L: its document, its blocks). The
        [x_t ; x_0] forward runs 2 positions per token; the encoder-decoder runs the n encoder layers
        over x_0 and the K decoder layers (and their keys and values of the encoder's features) over x_t."""
        cfg, d, length = self.cfg, self.cfg.model_dim, self.cfg.seq_len
        head = d * cfg.embed_rows
        layer = sum(m.weight.numel() for name, m in self.blocks[0].named_modules()
                    if isinstance(m, nn.Linear) and "adaln" not in name)
        layers = cfg.num_layers + cfg.decoder_layers
        per_position = 6 * (layers * layer + cfg.decoder_layers * 2 * d * d + head) + 12 * layers * d * length
        return (2 if cfg.block_size and not cfg.encoder_decoder else 1) * per_position

    def flop_formula(self) -> str:
        """How flops_per_token counts, in words."""
        if self.cfg.encoder_decoder:
            return ("6 (N_encoder + N_decoder + decoder K,V of the encoder's features + head) + "
                    "12 (n_encoder + n_decoder) d_model seq_len")
        if self.cfg.block_size:
            return "2 (6 N_matmul + 12 n_layers d_model seq_len): block diffusion runs [x_t ; x_0]"
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
            if clean is None or clean.shape != x_t.shape:
                raise ValueError("a block diffusion model needs the clean tokens (clean=x0) shaped like x_t")
            if self.cfg.encoder_decoder:
                return self.forward_encoder_decoder(x_t, sigma, clean, flex)
            return self.forward_blocks(x_t, sigma, clean, flex)
        cfg = self.cfg
        if doc_ids is None:
            doc_ids = document_ids(x_t, cfg.layout, cfg.tokens.pad)
        attn_mask = document_mask(doc_ids, flex and x_t.is_cuda, cfg.autoregressive, x_t.size(1))
        positions = torch.arange(x_t.size(1), device=x_t.device)
        return self.trunk(x_t, self.condition(sigma), positions, attn_mask)

    def forward_blocks(self, x_t: torch.Tensor, sigma: torch.Tensor | None, clean: torch.Tensor,
                       flex: bool = False) -> torch.Tensor:
        """Block diffusion's training and scoring forward: positions 0..L-1 hold x_t, L..2L-1 hold x_0
        at the same RoPE positions; block_attention_mask says who sees whom. Logits of the x_t half."""
        length, cfg = x_t.size(1), self.cfg
        docs = block_document_ids(x_t, clean, cfg.layout, cfg.tokens.pad, cfg.block_size)
        attn_mask = block_attention_mask(docs, length, cfg.block_size, flex and x_t.is_cuda)
        positions = torch.arange(length, device=x_t.device).repeat(2)
        cond = self.condition(sigma)
        if cond is not None:  # the clean half is at noise level 0, whatever the noisy half's
            clean_cond = self.condition(torch.zeros_like(sigma))
            cond = torch.cat([cond[:, None].expand(-1, length, -1), clean_cond[:, None].expand(-1, length, -1)], 1)
        return self.trunk(torch.cat([x_t, clean], 1), cond, positions, attn_mask)[:, :length]

    def forward_encoder_decoder(self, x_t: torch.Tensor, sigma: torch.Tensor | None, clean: torch.Tensor,
                                flex: bool = False) -> torch.Tensor:
        """Encoder-decoder block diffusion (E2D2): the layers encode x_0 (each clean block sees the clean
        blocks up to its own), then the decoder layers run over x_t, each noisy block attending to itself
        and, through each decoder layer's own key and value projections, to the encoder's (RMS-normed)
        features of the clean blocks before it. Outside training the encoder runs once per distinct
        clean row (the ELBO's rows repeat a slice once per step)."""
        length, cfg = x_t.size(1), self.cfg
        docs = block_document_ids(x_t, clean, cfg.layout, cfg.tokens.pad, cfg.block_size)
        encoder_mask, decoder_mask = encoder_decoder_masks(docs, length, cfg.block_size, flex and x_t.is_cuda)
        rotary = self.rotary(torch.arange(length, device=x_t.device))
        if self.training:
            features = self.encode(clean, rotary, encoder_mask)
        else:
            features = self.encode_distinct(clean, rotary, encoder_mask)
        context = F.rms_norm(features, (features.size(-1),))
        x, cond = self.embed(x_t), self.condition(sigma)
        for block in self.decoder_blocks:
            x = block(x, cond, rotary, decoder_mask, context=block.attn.keys_values(context, rotary))
        return self.logits(x, cond)

    def encode_distinct(self, clean: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                        attn_mask: AttentionMask) -> torch.Tensor:
        """encode(), run once per distinct row of clean and spread back to every row."""
        distinct, inverse = torch.unique(clean, dim=0, return_inverse=True)
        if distinct.size(0) == clean.size(0) or not isinstance(attn_mask, torch.Tensor):
            return self.encode(clean, rotary, attn_mask)
        first = torch.empty(distinct.size(0), dtype=torch.long, device=clean.device).scatter_(
            0, inverse, torch.arange(clean.size(0), device=clean.device))
        mask = attn_mask if attn_mask.size(0) == 1 else attn_mask[first]  # [1, ...]: the same for every row
        return self.encode(clean[first], rotary, mask)[inverse]

    def encode(self, clean: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], attn_mask: AttentionMask,
               caches: list[LayerCache] | None = None, store: bool = False) -> torch.Tensor:
        """The encoder's features [B, T, d] of clean tokens (at noise level 0), through the model's layers."""
        sigma0 = torch.zeros(clean.size(0), device=clean.device)
        x, cond = self.embed(clean), self.condition(sigma0 if self.noise is not None else None)
        for i, block in enumerate(self.blocks):
            x = block(x, cond, rotary, attn_mask, caches[i] if caches is not None else None, store)
        return x

    def new_cache(self) -> KVCache:
        """An empty cache of the clean past, for forward_cached: each layer's keys and values (and an
        encoder-decoder's decoder layers' keys and values of the encoder's features, after them)."""
        return KVCache(self.cfg.num_layers + self.cfg.decoder_layers)

    def forward_cached(self, x_block: torch.Tensor, sigma: torch.Tensor | None, cache: KVCache,
                       store: bool = False) -> torch.Tensor:
        """Logits of one block [B, n] that sits right after the cache's positions and attends to them
        and to itself (within documents; causally for an AR model; never to PAD). store: the block is
        clean, so append it to the cache as extend_cache does (AR coding stores every token as it goes,
        in the same forward)."""
        cfg, start = self.cfg, cache.length
        positions = torch.arange(start, start + x_block.size(1), device=x_block.device)
        attn_mask, docs = cached_attention_mask(cache, x_block, cfg.layout, cfg.tokens.pad, cfg.autoregressive)
        if not cfg.encoder_decoder:
            logits = self.trunk(x_block, self.condition(sigma), positions, attn_mask, cache.layers, store)
            if store:
                cache.append(docs)
            return logits
        rotary = self.rotary(positions)
        x, cond = self.embed(x_block), self.condition(sigma)
        for block, layer_cache in zip(self.decoder_blocks, cache.layers[cfg.num_layers:]):
            x = block(x, cond, rotary, attn_mask, layer_cache)
        logits = self.logits(x, cond)
        if store:
            self.extend_cache(cache, x_block)
        return logits

    def extend_cache(self, cache: KVCache, clean_block: torch.Tensor) -> None:
        """Append a finished clean block [B, n] to the cache, at noise level 0: its keys and values in
        every layer (an encoder-decoder: the encoder's, then each decoder layer's of its features)."""
        cfg, start = self.cfg, cache.length
        positions = torch.arange(start, start + clean_block.size(1), device=clean_block.device)
        attn_mask, docs = cached_attention_mask(cache, clean_block, cfg.layout, cfg.tokens.pad, cfg.autoregressive)
        rotary = self.rotary(positions)
        features = self.encode(clean_block, rotary, attn_mask, cache.layers, store=True)
        if cfg.encoder_decoder:
            context = F.rms_norm(features, (features.size(-1),))
            for block, layer_cache in zip(self.decoder_blocks, cache.layers[cfg.num_layers:]):
                layer_cache.extend(*block.attn.keys_values(context, rotary), store=True)
        cache.append(docs)

    def condition(self, sigma: torch.Tensor | None) -> torch.Tensor | None:
        """The noise embedding [B, cond_dim] fed to the adaLN projections, or None (unconditioned)."""
        return F.silu(self.noise(sigma)) if self.noise is not None else None

    def trunk(self, tokens: torch.Tensor, cond: torch.Tensor | None, positions: torch.Tensor,
              attn_mask: AttentionMask, caches: list[LayerCache] | None = None,
              store: bool = False) -> torch.Tensor:
        """Embedding, the blocks and the head: logits [B, T, vocab+2]."""
        x = self.embed(tokens) if self.digits is None else self.digits(tokens, self.embed)
        rotary = self.rotary(positions)
        for i, block in enumerate(self.blocks):
            x = block(x, cond, rotary, attn_mask, caches[i] if caches is not None else None, store)
        return self.logits(x, cond)

    def logits(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """The final norm (modulated like every block) and the head: logits [B, T, vocab+2]."""
        final = self.final_adaln(cond) if self.final_adaln is not None else self.final_modulation.expand(x.size(0), -1)
        shift, scale = final.chunk(2, dim=-1)
        x = modulate(F.rms_norm(x, (x.size(-1),)), shift, scale)
        return self.head(x)[..., : self.cfg.num_real_rows]
