"""Block diffusion's sampler: blocks left to right, each by the in-block sampler (ancestral, cached or
confidence) given the clean blocks before it, kept in a KV cache. `steps` is per block; the canvas may
run past seq_len (RoPE positions go on), and rows stop at a revealed BOS or EOS as elsewhere."""
from __future__ import annotations

import torch

from ..attention import KVCache
from ..config import Config
from ..dist import autocast
from .options import close_documents
from .steps import Denoising, Network


def denoise_blocks(model, cfg: Config, x: torch.Tensor, run: Denoising, kv_cache: bool) -> torch.Tensor:
    """Block diffusion's sampler: each block denoised by the in-block sampler given the clean blocks
    before it, which either sit in a KV cache (one clean forward per block, never recomputed) or are
    run again at every forward (kv_cache False: the training forward, as a check)."""
    tokens, cache = run.tokens, model.new_cache()
    for lo in range(0, x.size(1), cfg.block_size):
        hi = min(lo + cfg.block_size, x.size(1))
        if kv_cache:
            network = cached_network(model, cache)
        else:
            network = recomputing_network(model, cfg, x[:, :lo])
        # the past holds no boundary (closing turned it and what follows into PAD), so a block is
        # closed on its own: any boundary revealed in it, except the row's opening BOS, ends the row
        region = run.denoise(x[:, lo:hi].clone(), network,
                             lambda r: close_documents(r, tokens, opening=lo == 0))
        x = close_documents(torch.cat([x[:, :lo], region, x[:, hi:]], 1), tokens)
        if not bool((x[:, hi:] == tokens.mask).any()):
            break  # every row has ended its document
        if kv_cache:
            with autocast(x.device):
                model.forward_cached(x[:, lo:hi], torch.zeros(x.size(0), device=x.device), cache, store=True)
            run.count(torch.ones(x.size(0), dtype=torch.bool), hi - lo)
    return x


def cached_network(model, cache: KVCache) -> Network:
    """The block's logits from the cached forward: its rows' cached keys and values, then the block."""
    def network(region: torch.Tensor, rows: torch.Tensor, sigma_k: float) -> torch.Tensor:
        index = rows.nonzero().squeeze(1)
        sigma_in = torch.full((index.numel(),), sigma_k, dtype=torch.float32, device=region.device)
        with autocast(region.device):
            return model.forward_cached(region[index], sigma_in, cache.rows(index))
    return network


def recomputing_network(model, cfg: Config, past: torch.Tensor) -> Network:
    """The block's logits from the training forward over [x_t ; x_0] of the past and the block (padded
    with PAD to whole blocks): the noisy block sees exactly the clean blocks before it."""
    def network(region: torch.Tensor, rows: torch.Tensor, sigma_k: float) -> torch.Tensor:
        index = rows.nonzero().squeeze(1)
        seq = torch.cat([past[index], region[index]], 1)
        fill = -seq.size(1) % cfg.block_size
        seq = torch.cat([seq, torch.full((seq.size(0), fill), cfg.tokens.pad, dtype=seq.dtype, device=seq.device)], 1)
        sigma_in = torch.full((index.numel(),), sigma_k, dtype=torch.float32, device=region.device)
        with autocast(region.device):
            logits = model(seq, sigma_in, seq)
        return logits[:, past.size(1): past.size(1) + region.size(1)]
    return network
