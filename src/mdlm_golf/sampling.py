"""Generation from a trained MDLM: ancestral, lazily evaluated ("cached") and confidence-ordered samplers.

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

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .attention import KVCache
from .config import BOS_ID, EOS_ID, Config, Tokens
from .diffusion import reveal_weights, sigma, subs_log_probs
from .dist import autocast

SAMPLERS = ("ancestral", "cached", "confidence")


@dataclass(frozen=True)
class SampleOptions:
    """What to generate; check() turns bad values into one-line ValueErrors."""

    num: int
    length: int  # row length, counting the leading BOS
    steps: int
    sampler: str = "ancestral"
    prompt_ids: tuple[int, ...] = ()
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def check(self, cfg: Config) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        for name in ("num", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a positive finite number, got {self.temperature} "
                             "(for greedy decoding use a tiny top_p)")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.length > cfg.seq_len and not cfg.blockwise:  # block sampling goes on past it
            raise ValueError(f"length {self.length} exceeds the model's training length "
                             f"seq_len={cfg.seq_len}")
        if self.length < len(self.prompt_ids) + 2:
            raise ValueError(f"length {self.length} leaves nothing to generate after BOS and a "
                             f"{len(self.prompt_ids)}-token prompt")
        bad = [t for t in self.prompt_ids if not 0 <= t < cfg.vocab_size or t in (BOS_ID, EOS_ID)]
        if bad:
            raise ValueError(f"prompt ids must be real tokens in [0, {cfg.vocab_size}) other than BOS "
                             f"({BOS_ID}) and EOS ({EOS_ID}), which end documents; got {bad[:5]}")


@dataclass
class SampleResult:
    rows: list[list[int]]  # each sample from its BOS up to (not including) its document boundary
    canvas: torch.Tensor  # [num, length] final ids on the CPU: PAD from each row's boundary on
    options: SampleOptions
    nfe: int  # network forwards, a batched forward counted once
    row_nfe: list[int]  # forwards that included each row
    positions: int  # token positions run through the network: sum over forwards of rows x width
    generated_tokens: int  # ids in rows after BOS and the prompt
    elapsed: float  # seconds
    widths: list[int] = field(default_factory=list)  # sequence width of each forward

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.elapsed if self.elapsed > 0 else float("inf")

    @property
    def nfe_saved(self) -> int:
        """Forwards saved against one per step (lazy evaluation and early finishes)."""
        return self.options.steps - self.nfe


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
    if cfg.objective == "ar":
        return generate_left_to_right(model, cfg, opts, device)
    tokens = Tokens(cfg.vocab_size)
    x = initial_canvas(opts, tokens).to(device)
    run = Denoising(opts, cfg, row_generators(opts), num)
    start = time.perf_counter()
    with torch.inference_mode():
        if cfg.blockwise:
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


# network(region [N, W], rows bool [N], sigma_k) -> logits [rows, <= W, vocab+2] of the chosen rows
Network = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


class Denoising:
    """The reverse process over a region of the canvas (all of it, or one block), and its counters."""

    def __init__(self, opts: SampleOptions, cfg: Config, generators: list[torch.Generator], num: int):
        self.opts, self.generators, self.tokens = opts, generators, Tokens(cfg.vocab_size)
        self.weights = reveal_weights(opts.steps, cfg.noise_eps).tolist()  # [k - 1]: reveal chance at step k
        self.sigmas = sigma(torch.arange(opts.steps + 1, dtype=torch.float64) / opts.steps, cfg.noise_eps).tolist()
        self.nfe, self.row_nfe, self.positions, self.widths = 0, torch.zeros(num, dtype=torch.long), 0, []

    def denoise(self, region: torch.Tensor, network: Network,
                close: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Steps T..1 on `region`; close(region) after each reveal ends documents at a boundary."""
        opts, tokens = self.opts, self.tokens
        for k in range(opts.steps, 0, -1):
            masked = region == tokens.mask
            active = masked.any(1)
            if not bool(active.any()):
                break  # every row is fully revealed (boundaries or confidence rounding)
            if opts.sampler == "confidence":
                pick, rows = masked, active
            else:
                u = torch.stack([torch.rand(region.size(1), generator=g) for g in self.generators])
                pick = masked & (u.to(region.device) < self.weights[k - 1])
                rows = active if opts.sampler == "ancestral" else pick.any(1)
                if not bool(rows.any()):
                    continue  # lazy: nothing revealed, so no logits are needed
            logits = network(region, rows, self.sigmas[k])
            self.count(rows, logits.size(1))
            reveal_tokens(region, pick, rows, logits, self.weights[k - 1], self.generators, opts, tokens)
            region = close(region)
        return region

    def count(self, rows: torch.Tensor, width: int) -> None:
        self.nfe, self.positions = self.nfe + 1, self.positions + int(rows.sum()) * width
        self.row_nfe += rows.cpu()
        self.widths.append(width)


def denoise_blocks(model, cfg: Config, x: torch.Tensor, run: Denoising, kv_cache: bool) -> torch.Tensor:
    """Block diffusion's sampler: each block denoised by the in-block sampler given the clean blocks
    before it, which either sit in a KV cache (one clean forward per block, never recomputed) or are
    run again at every forward (kv_cache False: the training forward, as a check)."""
    tokens, cache = run.tokens, KVCache(cfg.num_layers)
    for lo in range(0, x.size(1), cfg.block):
        hi = min(lo + cfg.block, x.size(1))
        if kv_cache:
            network = cached_network(model, cache)
        else:
            network = recomputing_network(model, cfg, x[:, :lo])
        region = run.denoise(x[:, lo:hi].clone(), network, lambda r: close_region(x, r, lo, tokens))
        x = close_documents(torch.cat([x[:, :lo], region, x[:, hi:]], 1), tokens)
        if not bool((x[:, hi:] == tokens.mask).any()):
            break  # every row has ended its document
        if kv_cache:
            with autocast(x.device):
                model.forward_cached(x[:, lo:hi], torch.zeros(x.size(0), device=x.device), cache, store=True)
            run.count(torch.ones(x.size(0), dtype=torch.bool), hi - lo)
    return x


def close_region(x: torch.Tensor, region: torch.Tensor, lo: int, tokens: Tokens) -> torch.Tensor:
    """close_documents for a block: a boundary revealed in it ends its row there."""
    return close_documents(torch.cat([x[:, :lo], region], 1), tokens)[:, lo:]


def cached_network(model, cache: KVCache) -> Network:
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
        fill = -seq.size(1) % cfg.block
        seq = torch.cat([seq, torch.full((seq.size(0), fill), cfg.pad_id, dtype=seq.dtype, device=seq.device)], 1)
        sigma_in = torch.full((index.numel(),), sigma_k, dtype=torch.float32, device=region.device)
        with autocast(region.device):
            logits = model(seq, sigma_in, clean=seq)
        return logits[:, past.size(1): past.size(1) + region.size(1)]
    return network


def row_generators(opts: SampleOptions) -> list[torch.Generator]:
    return [torch.Generator().manual_seed((opts.seed * 1_000_003 + i) % 2**63) for i in range(opts.num)]


def generate_left_to_right(model, cfg: Config, opts: SampleOptions, device: torch.device) -> SampleResult:
    """An autoregressive model's samples: one token per forward, each row until its document ends.

    The canvas is the diffusion samplers' (BOS, prompt, MASK...), filled left to right; a row whose
    new token is BOS or EOS is closed (PAD from there) and leaves the batch. `steps` is not used.
    """
    tokens = Tokens(cfg.vocab_size)
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


def initial_canvas(opts: SampleOptions, tokens: Tokens) -> torch.Tensor:
    """[num, length]: BOS, the prompt (visible, frozen), then MASK."""
    row = [BOS_ID, *opts.prompt_ids] + [tokens.mask] * (opts.length - 1 - len(opts.prompt_ids))
    return torch.tensor(row, dtype=torch.long).repeat(opts.num, 1)


def close_documents(x: torch.Tensor, tokens: Tokens) -> torch.Tensor:
    """PAD from the first BOS or EOS after position 0 of each row on: the next document starts there."""
    boundary = (x == BOS_ID) | (x == EOS_ID)
    boundary[:, 0] = False
    return torch.where(boundary.cumsum(1) > 0, torch.full_like(x, tokens.pad), x)


def first_pad(row: torch.Tensor, tokens: Tokens) -> int:
    pads = (row == tokens.pad).nonzero()
    return int(pads[0]) if len(pads) else row.numel()


def live_widths(x: torch.Tensor, tokens: Tokens) -> torch.Tensor:
    """Per row: positions the network must see, those before the first PAD (PAD is only a suffix)."""
    return x.size(1) - (x == tokens.pad).sum(1)


def run_network(model, x: torch.Tensor, rows: torch.Tensor, widths: torch.Tensor,
                sigma_k: float) -> torch.Tensor:
    """Logits [rows, W, vocab+2] for the selected rows, sliced to W = their widest live width.

    When a row is narrower than W, doc_ids put its PAD tail in a document of its own (id -1, as
    diffusion.document_ids does), so its document attends only to itself.
    """
    index = rows.nonzero().squeeze(1)
    row_widths = widths[index]
    width = int(row_widths.max())
    x_in = x[index, :width]
    doc_ids = None
    if int(row_widths.min()) < width:
        doc_ids = -(torch.arange(width, device=x.device)[None] >= row_widths[:, None]).long()
    sigma_in = torch.full((index.numel(),), sigma_k, dtype=torch.float32, device=x.device)
    with autocast(x.device):
        return model(x_in, sigma_in, doc_ids)


def reveal_tokens(x: torch.Tensor, pick: torch.Tensor, rows: torch.Tensor, logits: torch.Tensor,
                  weight: float, generators: list[torch.Generator], opts: SampleOptions,
                  tokens: Tokens) -> None:
    """Draw tokens at `pick` (all of them, or for "confidence" the most confident few) into x in place."""
    b, pos = pick.nonzero(as_tuple=True)  # row-major, the order the per-row noise is drawn in
    if b.numel() == 0:
        return
    slot = rows.long().cumsum(0) - 1  # row of the batch -> row of the forward
    ids, prob = sample_tokens(logits[slot[b], pos], pick.sum(1).tolist(), generators,
                              opts.temperature, opts.top_p, tokens)
    if opts.sampler == "confidence":
        keep = most_confident(pick, b, pos, prob, weight)
        b, pos, ids = b[keep], pos[keep], ids[keep]
    x[b, pos] = ids


def sample_tokens(logits: torch.Tensor, counts: list[int], generators: list[torch.Generator],
                  temperature: float, top_p: float, tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """One id per row of logits [N, vocab+2] at masked positions (SUBS: MASK/PAD impossible).

    Gumbel-max over the tempered, nucleus-filtered distribution; counts[i] rows belong to sample i and
    take their noise from generators[i]. Returns the ids and the model's own probability of each
    (before temperature and top-p, as LLaDA ranks by: a filtered probability would be 1 under greedy).
    """
    log_p = subs_log_probs(logits, tokens)
    log_q = log_p if temperature == 1.0 else F.log_softmax(log_p / temperature, dim=-1)
    if top_p < 1.0:
        log_q = nucleus(log_q, top_p)
    u = torch.cat([torch.rand(n, tokens.vocab_size, generator=g) for n, g in zip(counts, generators) if n])
    gumbel = -torch.log(-torch.log(u.clamp(min=torch.finfo(u.dtype).tiny)))
    ids = (log_q + gumbel.to(log_q.device)).argmax(-1)
    return ids, log_p.gather(-1, ids[:, None]).squeeze(-1).exp()


def nucleus(log_p: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most likely ids whose mass reaches top_p (always the top one), renormalized."""
    sorted_log_p, order = log_p.sort(dim=-1, descending=True, stable=True)
    sorted_p = sorted_log_p.exp()
    drop_sorted = sorted_p.cumsum(-1) - sorted_p >= top_p  # mass strictly before this id
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return F.log_softmax(log_p.masked_fill(drop, float("-inf")), dim=-1)


def most_confident(pick: torch.Tensor, b: torch.Tensor, pos: torch.Tensor, prob: torch.Tensor,
                   weight: float) -> torch.Tensor:
    """Which candidates to reveal: per row the round(masked * weight) (>= 1) most probable ones."""
    masked = pick.sum(1)
    quota = torch.minimum((masked.double() * weight).round().clamp(min=1), masked.double())
    confidence = torch.full(pick.shape, -1.0, dtype=prob.dtype, device=pick.device)
    confidence[b, pos] = prob
    order = confidence.sort(dim=1, descending=True, stable=True).indices  # ties: leftmost first
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(pick.size(1), device=pick.device)
                                            .expand_as(order).contiguous())
    return rank[b, pos] < quota[b]


def decode_rows(sp, rows: list[list[int]]) -> list[str]:
    """Text of each sample: its ids after the leading BOS, decoded by the SentencePiece processor."""
    return [sp.decode([int(t) for t in row[1:]]) for row in rows]
