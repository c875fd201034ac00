"""The MDLM's figure: the T-step discrete-time absorbing-mask ELBO, an upper bound on the code length
of the slices, in bits per byte."""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from ..config import Config
from ..data import ByteTable
from ..diffusion import elbo_grid, mask_shape, reveal_weights, terminal_bits
from ..dist import autocast, rank_and_world, to_device
from ..subtokens import digit_code
from .harness import MODES, EvalSlices, make_slices, rank_share, reduce_sum, scored_positions, summarize


def slice_mask_draws(slice_index: int, steps: int, seq_len: int, seed: int, draw: int = 0,
                     digits: int = 1) -> torch.Tensor:
    """Uniform draws [T, L] (sub-tokens: [T, L, digits]) for one slice; seeded by (seed, slice, draw) so
    batching never changes them."""
    key = np.random.SeedSequence([seed, int(slice_index), draw]).generate_state(1, np.uint64)[0]
    generator = torch.Generator().manual_seed(int(key) & (2**63 - 1))
    return torch.rand(mask_shape(steps, seq_len, digits), generator=generator, dtype=torch.float64)


@torch.no_grad()
def elbo_bits(model, slices: EvalSlices, mode: str, steps: int, eps: float, vocab_size: int,
              seed: int, batch_rows: int, device: torch.device, *, grid: str = "linear",
              draw: int = 0, digits: int = 1) -> np.ndarray:
    """Expected bits of each slice under the T-step ELBO, one mask draw per (slice, step); float64 [S].

    Rows are (slice, step) pairs batched together; bf16 autocast on CUDA, float64 accumulation. The
    model reads x_t and the clean slice: a block diffusion model denoises each block given the clean
    blocks before it, so a row holds step k of every block's own ELBO and the sum over rows is the
    sum over blocks of their T-step bounds. A sub-token model (digits > 1) has each digit masked on its
    own and pays for its masked digits' marginals.
    """
    code = digit_code(vocab_size, digits)
    alphas = elbo_grid(steps, eps, grid)[1:]  # alpha at t_1..t_T
    weights = reveal_weights(steps, eps, grid)
    sigmas = (-torch.log(alphas)).float()
    jobs = [(s, k) for s in range(len(slices)) for k in range(steps)]
    bits = torch.zeros(len(slices), dtype=torch.float64, device=device)  # read once, at the end
    draws: dict[int, torch.Tensor] = {}
    for start in range(0, len(jobs), batch_rows):
        rows, steps_k = map(list, zip(*jobs[start:start + batch_rows]))
        for s in set(rows) - set(draws):
            draws[s] = slice_mask_draws(slices.index[s], steps, slices.tokens.shape[1], seed, draw, digits)
        x0 = to_device(slices.tokens[rows], device)
        u = torch.stack([draws[s][k] for s, k in zip(rows, steps_k)])
        below = (u < (1.0 - alphas[steps_k]).view(-1, *[1] * (u.dim() - 1))).numpy()
        scored = scored_positions(x0, mode, code.tokens.pad)
        x_t, masked = code.apply(x0, to_device(below, device) & (scored if digits == 1 else scored[..., None]))
        with autocast(device):
            sigma_k = to_device(sigmas[steps_k].numpy(), device)
            logits = model(x_t, sigma_k, x0)
        nll = code.nll(logits, x_t, x0).double() / math.log(2)
        row_bits = torch.where(masked, nll, 0.0).sum(-1) * to_device(weights[steps_k].numpy(), device)
        bits.index_add_(0, to_device(np.asarray(rows), device), row_bits)
        for s in [s for s in draws if s < rows[-1]]:
            del draws[s]  # jobs run slice by slice, so earlier slices are finished
    return bits.cpu().numpy()


def evaluate_elbo(model, val_tokens: np.ndarray, byte_table: ByteTable, cfg: Config, *, steps: int,
                  num_seqs: int, seed: int, modes: tuple[str, ...] = MODES, draws: int = 1,
                  grid: str = "linear", device: torch.device) -> dict[str, dict]:
    """Strict and anchored ELBO bpb of `model` on the first num_seqs val slices (0 = all).

    With draws = K > 1 each slice gets K independent mask draws: bpb is their mean, bpb_stderr its
    standard error (how much of a difference between two models is mask noise). Under torchrun
    each rank takes slices rank, rank + world, ... and bits, tokens and bytes are summed over ranks
    in float64: the figure equals the single-process one (masks are seeded per slice).
    """
    world, code = rank_and_world()[1], digit_code(cfg.vocab_size, cfg.subtokens)
    slices = make_slices(val_tokens, cfg.seq_len, num_seqs, byte_table, cfg.tokens.pad)
    mine = rank_share(slices)
    results = {}
    for mode in modes:
        began = time.perf_counter()
        bits = [elbo_bits(model, mine, mode, steps, cfg.noise_eps, cfg.vocab_size, seed, cfg.eval_batch_rows,
                          device, grid=grid, draw=d, digits=cfg.subtokens).sum() for d in range(draws)]
        scored = scored_positions(torch.from_numpy(mine.tokens), mode, cfg.tokens.pad).sum().item()
        *draw_bits, num_tokens, num_bytes = reduce_sum([*bits, scored, mine.token_bytes.sum()], device)
        seconds = time.perf_counter() - began
        terminal = terminal_bits(steps, cfg.noise_eps, code.terminal_bits_per_token(), grid) * num_tokens
        draw_bpb = np.array([(b + terminal) / num_bytes for b in draw_bits])
        blocks = f" per block of {cfg.block_size} tokens given the clean blocks before it" if cfg.block_size else ""
        blocks += f" over {code.digits} base-{code.base} digits per token" if code.digits > 1 else ""
        results[mode] = summarize(
            float(np.mean(draw_bits)) + terminal, int(num_tokens), int(num_bytes),
            method="elbo", mode=mode, kind=f"{mode} {steps}-step ELBO upper bound" + (
                f", blocks of {cfg.block_size}" if cfg.block_size else "") + (
                f", {code.digits} sub-token digits" if code.digits > 1 else ""),
            bound=f"upper bound: {steps}-step discrete-time absorbing-mask ELBO ({grid} grid){blocks}, "
                  f"mean of {draws} mask draw(s) per slice",
            elbo_steps=steps, grid=grid, draws=draws, block_size=cfg.block_size or cfg.seq_len,
            bpb_stderr=float(draw_bpb.std(ddof=1) / math.sqrt(draws)) if draws > 1 else None,
            num_seqs=len(slices), seq_len=cfg.seq_len, noise_eps=cfg.noise_eps,
            seed=seed, eval_seconds=seconds, world_size=world,
            seconds_per_slice_per_process=seconds * world / max(1, len(slices)) / draws,
        )
    return results
