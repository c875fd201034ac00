"""Generation from a trained model: ancestral, lazily evaluated ("cached") and confidence-ordered samplers.

Every sample is a row [BOS, prompt..., MASK...] denoised over the training schedule's time grid
t_k = k / T, k = T..1. Design points (the tests check each):

- Reveal first, then evaluate. One ancestral step from t_k to t_{k-1} reveals each masked position
  with probability w_k = (alpha_{k-1} - alpha_k) / (1 - alpha_k), independently of the network, and a
  revealed position takes a token from the SUBS distribution p(. | x_t, sigma_k). So the reveal
  uniforms are drawn before the network runs, and token noise only for the revealed positions.
- "cached" (MDLM's cached sampler, done lazily): a row whose reveal set is empty at step k does not
  need the network at all, so it is left out of that forward; a step where no row reveals anything
  runs no forward. The logits that are used are always those of the current x_t at the current
  sigma_k, so this is *exact* ancestral sampling for any denoiser, time-dependent or not, and with the
  same seed it returns the same tokens as "ancestral" (which runs every still-masked row every step).
  The number of forwards equals that of MDLM's reuse-the-last-logits cache (one per changed x_t);
  MDLM's version evaluates at the sigma of the step after the change, which is only exact for a
  time-independent denoiser.
- "confidence" (LLaDA-style): every step samples candidates at all masked positions and reveals the
  n_k = round(masked * w_k) (at least 1) whose candidate has the highest model probability (before
  temperature and top-p); w_1 = 1, so all are revealed within T forwards.
- Documents end at a revealed BOS or EOS at position j > 0: positions j.. become PAD (never masked,
  never predicted). A forward is sliced to the longest live document among its rows, and a shorter
  row's PAD tail gets its own document id (doc_ids, the masking the docs/packed layouts train with),
  so no document attends to PAD and a row sees exactly what it would see alone: its distribution does
  not depend on which other rows share its batch.
- Randomness: one torch.Generator per row, seeded from (seed, row), drawn on the CPU. Draws happen
  in the same order for "ancestral" and "cached", so the two agree token for token.
"""
from __future__ import annotations

import time

import torch

from ..config import Config
from ..dist import autocast
from .blocks import denoise_blocks
from .options import (SampleOptions, SampleResult, close_documents, first_pad, initial_canvas, live_widths,
                      row_generators)
from .steps import Denoising, run_network, sample_tokens


def generate(model, cfg: Config, *, num: int, length: int, steps: int, sampler: str = "ancestral",
             prompt_ids: list[int] | None = None, temperature: float = 1.0, top_p: float = 1.0,
             seed: int = 0, device: torch.device | str = "cpu", kv_cache: bool = True) -> SampleResult:
    """Sample `num` documents of at most `length` ids (BOS included) in at most `steps` forwards
    (a block diffusion model: `steps` per block, blocks left to right, the clean past in a KV cache
    unless kv_cache is False, which recomputes it every forward)."""
    opts = SampleOptions(num, length, steps, sampler, tuple(int(t) for t in prompt_ids or ()),
                         float(temperature), float(top_p), int(seed))
    opts.check(cfg)
    device = torch.device(device)
    if cfg.autoregressive:
        return generate_left_to_right(model, cfg, opts, device)
    tokens = cfg.tokens
    x = initial_canvas(opts, tokens).to(device)
    run = Denoising(opts, cfg, row_generators(opts))
    start = time.perf_counter()
    with torch.inference_mode():
        if cfg.block_size:
            x = denoise_blocks(model, cfg, x, run, kv_cache)
        else:
            def network(canvas: torch.Tensor, rows: torch.Tensor, sigma_k: float) -> torch.Tensor:
                return run_network(model, canvas, rows, live_widths(canvas, tokens), sigma_k)

            x = run.denoise(x, network, lambda canvas: close_documents(canvas, tokens))
        canvas = x.cpu()
    elapsed = time.perf_counter() - start
    assert not bool((canvas == tokens.mask).any()), "a MASK survived the last step"
    rows_out = [row[: first_pad(row, tokens)].tolist() for row in canvas]
    generated = sum(len(r) - 1 - len(opts.prompt_ids) for r in rows_out)
    return SampleResult(rows_out, canvas, opts, run.nfe, run.row_nfe.tolist(), run.positions, generated, elapsed,
                        run.widths)


def generate_left_to_right(model, cfg: Config, opts: SampleOptions, device: torch.device) -> SampleResult:
    """An autoregressive model's samples: one token per forward, each row until its document ends.

    The canvas is the diffusion samplers' (BOS, prompt, MASK...), filled left to right; a row whose
    new token is BOS or EOS is closed (PAD from there) and leaves the batch. `steps` is not used.
    """
    tokens = cfg.tokens
    x = initial_canvas(opts, tokens).to(device)
    generators = row_generators(opts)
    nfe, row_nfe, positions, widths = 0, torch.zeros(opts.num, dtype=torch.long), 0, []
    start = time.perf_counter()
    with torch.inference_mode():
        for pos in range(1 + len(opts.prompt_ids), opts.length):
            live = (x[:, pos] == tokens.mask).cpu()
            if not bool(live.any()):
                break  # every row has ended its document
            index = live.nonzero().squeeze(1)
            with autocast(device):
                logits = model(x[index.to(device), :pos])[:, -1]
            ids, _ = sample_tokens(logits, live.long().tolist(), generators, opts.temperature, opts.top_p, tokens)
            x[index.to(device), pos] = ids
            x = close_documents(x, tokens)
            nfe, positions = nfe + 1, positions + index.numel() * pos
            row_nfe += live.long()
            widths.append(pos)
        canvas = x.cpu()
    elapsed = time.perf_counter() - start
    rows_out = [row[: first_pad(row, tokens)].tolist() for row in canvas]
    generated = sum(len(r) - 1 - len(opts.prompt_ids) for r in rows_out)
    return SampleResult(rows_out, canvas, opts, nfe, row_nfe.tolist(), positions, generated, elapsed, widths)
