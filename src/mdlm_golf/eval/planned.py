"""Planned-order code length: an exact code length of the val text, not a bound (project issue 8).

A slice is decoded from fully masked in passes. Each pass runs the network on what is revealed so far,
picks the next positions with a rule that sees only that output and the revealed tokens, and charges
-log2 p(x_i | revealed) for each picked token under the SUBS distribution (MASK and PAD impossible).
Revealing m tokens per pass codes them with the product of their marginals: still a valid code,
decodable in the same order, at L / m network evaluations per slice (m = 1, left to right, is the
chain rule). The coder (coder/) turns these numbers into a file by running the very same loop.

Design choices (the tests check each):
- sigma: the network is conditioned as in training, where a position is masked with probability
  1 - alpha(t) = (1 - eps) t. A pass with a fraction f of the slice's scored positions still masked
  gets t = min(f / (1 - eps), 1), so sigma = -log(1 - f), clamped at f = 1 - eps to sigma(1) =
  -log(eps), the largest noise level training ever saw (and the ELBO's first step uses).
- Schedule: `tokens_per_pass=m` reveals m per pass (fewer in the last); `passes=P` spreads a slice's
  n scored positions evenly over min(P, n) passes, pass k revealing ceil(nk/P) - ceil(n(k-1)/P).
  A slice whose schedule is done leaves the forward: network evaluations per slice = its passes.
- Ties go to the leftmost position; nothing is random. Confidence and margin are ranked after
  rounding to the nearest multiple of 1/1024 (bin edges halfway, so 0 and 1 are bin centres). Raw
  float scores would let a choice between near-equal scores hang on float rounding, which differs
  with the batch shape, the device and bf16 (a saturated model scores many positions 1 - ulp); with
  bins, rounding noise flips a choice only when a score sits within an ulp of a bin edge.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..config import Config, Tokens
from ..data import ByteTable
from ..diffusion import sigma, subs_log_probs, subs_logits
from ..dist import autocast, rank_and_world
from .harness import MODES, EvalSlices, make_slices, rank_share, reduce_sum, scored_positions, summarize

ORDERS = ("left-to-right", "confidence", "margin")
SCORE_BINS = 1024  # confidence and margin are ranked in steps of 1/1024, ties to the leftmost


@dataclass(frozen=True)
class Schedule:
    """How many positions each pass reveals: a fixed count per pass, or a fixed number of passes."""

    tokens_per_pass: int | None = None
    passes: int | None = None

    def __post_init__(self) -> None:
        if (self.tokens_per_pass is None) == (self.passes is None):
            raise ValueError("give exactly one of tokens_per_pass and passes")
        value = self.tokens_per_pass if self.passes is None else self.passes
        if int(value) != value or value < 1:
            name = "tokens_per_pass" if self.passes is None else "passes"
            raise ValueError(f"{name} must be a whole number >= 1, got {value}")
        object.__setattr__(self, "passes" if self.tokens_per_pass is None else "tokens_per_pass", int(value))

    def counts(self, n: int) -> list[int]:
        """Positions revealed by each pass of a slice with n scored positions (sum = n, each >= 1)."""
        if self.tokens_per_pass is not None:
            m = self.tokens_per_pass
            return [m] * (n // m) + ([n % m] if n % m else [])
        p = min(self.passes, n)
        if p == 0:
            return []
        revealed = [-(-n * k // p) for k in range(p + 1)]  # ceil(n k / p) after pass k
        return [b - a for a, b in zip(revealed, revealed[1:])]

    def describe(self) -> str:
        if self.tokens_per_pass is not None:
            return f"{self.tokens_per_pass} token(s) per pass"
        return f"{self.passes} passes"


def check_order(order: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")


def pass_sigma(masked: torch.Tensor, scored_count: torch.Tensor, eps: float) -> torch.Tensor:
    """sigma [B] (float32) for rows with `masked` of their `scored_count` positions still masked."""
    f = masked.sum(1).double() / scored_count.double().clamp(min=1)
    t = (f / (1.0 - eps)).clamp(max=1.0)
    return sigma(t, eps).float()


def choose_positions(logits: torch.Tensor, masked: torch.Tensor, counts: torch.Tensor,
                     order: str) -> torch.Tensor:
    """The next positions to reveal, bool [B, L]: counts[b] of row b's masked positions.

    Sees only the (MASK/PAD-suppressed) logits and which positions are masked, so a decoder that has
    the revealed tokens makes the same choice. Ties go to the leftmost position (a stable sort).
    """
    batch, length = masked.shape
    position = torch.arange(length, device=masked.device)
    if order == "left-to-right":
        score = -position.float().expand(batch, length)
    else:
        lse = torch.logsumexp(logits, dim=-1)
        top = logits.topk(2, dim=-1).values
        score = torch.exp(top[..., 0] - lse)
        if order == "margin":
            score = score - torch.exp(top[..., 1] - lse)
        score = torch.round(score * SCORE_BINS)  # rounding noise flips a choice only at a bin edge
    key = (-score).masked_fill(~masked, float("inf"))
    ranked = torch.argsort(key, dim=1, stable=True)
    rank = torch.empty_like(ranked).scatter_(1, ranked, position.expand(batch, length).contiguous())
    return masked & (rank < counts.to(masked.device)[:, None])


# reveal(rows, logits, chosen, cols) -> ids [len(rows), W] (read at `chosen` only): charges or codes the
# chosen tokens of the rows' columns `cols` (the region being decoded) from their logits, says what they are
Reveal = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, slice], torch.Tensor]
# network(x_region_rows [R, W], sigma [R], rows [R]) -> logits [R, W, vocab+2]
Network = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def run_planned(model, x: torch.Tensor, scored: torch.Tensor, schedule: Schedule, order: str,
                eps: float, tokens: Tokens, reveal: Reveal, block: int = 0) -> list[int]:
    """Decode rows x [B, L] (MASK at every scored position) in place; returns forwards per row.

    Pass k runs the network on the rows whose schedule has a k-th pass, chooses their positions and
    asks `reveal` for the tokens there. Everything the choice depends on is in x before the reveal.
    Blocks of `block` tokens (0: the whole row) are decoded left to right, each with the schedule: the
    first reads only itself (model(x, sigma, x)); once it is decoded it goes into the model's KV
    cache, and every later block is decoded against the cached clean past (model.forward_cached), so
    a block costs its own passes, not the whole row's.
    """
    check_order(order)
    width = block or x.size(1)
    forwards, cache = [0] * x.size(0), None
    for lo in range(0, x.size(1), width):
        cols = slice(lo, min(lo + width, x.size(1)))
        if cache is None:
            network = lambda region, s, rows: model(region, s, region)  # noqa: E731 - nothing cached yet
        else:
            network = lambda region, s, rows, past=cache: model.forward_cached(region, s, past.rows(rows))  # noqa: E731
        counts = decode_passes(network, x, scored, cols, schedule, order, eps, tokens, reveal)
        forwards = [a + b for a, b in zip(forwards, counts)]
        if cols.stop < x.size(1):
            cache = cache or model.new_cache()
            model.extend_cache(cache, x[:, cols])
    return forwards


def decode_passes(network: Network, x: torch.Tensor, scored: torch.Tensor, cols: slice, schedule: Schedule,
                  order: str, eps: float, tokens: Tokens, reveal: Reveal) -> list[int]:
    """run_planned's passes over the scored positions of x's columns `cols` (all of a row, or one block),
    written into x in place."""
    region, region_scored = x[:, cols], scored[:, cols]
    counts = [schedule.counts(int(n)) for n in region_scored.sum(1).tolist()]
    num_passes = max((len(c) for c in counts), default=0)
    table = torch.zeros(x.size(0), num_passes, dtype=torch.long)
    for b, c in enumerate(counts):
        table[b, : len(c)] = torch.tensor(c, dtype=torch.long)
    scored_count = region_scored.sum(1)
    for k in range(num_passes):
        rows = (table[:, k] > 0).nonzero().squeeze(1).to(x.device)
        x_rows = region[rows]
        masked = (x_rows == tokens.mask) & region_scored[rows]
        with autocast(x.device):
            logits = network(x_rows, pass_sigma(masked, scored_count[rows], eps), rows)
        logits = subs_logits(logits, tokens)
        chosen = choose_positions(logits, masked, table[rows.cpu(), k], order)
        values = reveal(rows, logits, chosen, cols)
        region[rows] = torch.where(chosen, values.to(x.device), x_rows)
    if bool(((region == tokens.mask) & region_scored).any()):
        raise AssertionError("a MASK survived the last pass")  # a schedule bug, never data
    return [len(c) for c in counts]


def masked_start(x0: torch.Tensor, scored: torch.Tensor, tokens: Tokens) -> torch.Tensor:
    """The first state: every scored position masked, the rest (BOS anchors, PAD) as they are."""
    return torch.where(scored, torch.full_like(x0, tokens.mask), x0)


@torch.no_grad()
def planned_bits(model, slices: EvalSlices, mode: str, order: str, *, passes: int | None = None,
                 tokens_per_pass: int | None = None, eps: float, vocab_size: int, batch_rows: int,
                 device: torch.device, block: int = 0) -> np.ndarray:
    """Exact planned-order code length of each slice in bits, float64 [S].

    The charge -log2 p(x_i | revealed) is taken in float64 from the network's logits at the chosen
    positions, so a context-free model reproduces its unigram code length to rounding.
    """
    schedule, tokens = Schedule(tokens_per_pass, passes), Tokens(vocab_size)
    bits = np.zeros(len(slices), dtype=np.float64)
    for start in range(0, len(slices), batch_rows):
        x0 = torch.from_numpy(slices.tokens[start:start + batch_rows]).to(device)
        scored = scored_positions(x0, mode, tokens.pad)
        batch_bits = torch.zeros(x0.size(0), dtype=torch.float64, device=device)

        def charge(rows, logits, chosen, cols):
            truth = x0[rows][:, cols]
            log_p = subs_log_probs(logits[chosen], tokens, torch.float64)
            nll = -log_p.gather(-1, truth[chosen][:, None]).squeeze(1) / math.log(2)
            row_of = rows[:, None].expand_as(chosen)[chosen]
            batch_bits.index_add_(0, row_of, nll)
            return truth

        run_planned(model, masked_start(x0, scored, tokens), scored, schedule, order, eps, tokens, charge, block)
        bits[start:start + x0.size(0)] = batch_bits.cpu().numpy()
    return bits


def evaluate_planned(model, val_tokens: np.ndarray, byte_table: ByteTable, cfg: Config, *, order: str,
                     passes: int | None = None, tokens_per_pass: int | None = None, num_seqs: int,
                     modes: tuple[str, ...] = MODES, device: torch.device) -> dict[str, dict]:
    """Planned-order bpb of a masked-diffusion `model` on the first num_seqs val slices (0 = all), per mode.

    Same slices, bytes and distributed split as the ELBO: rank r takes slices r, r + world, ...; bits,
    tokens, bytes and network evaluations are summed over ranks in float64.
    """
    schedule = Schedule(tokens_per_pass, passes)
    check_order(order)
    world = rank_and_world()[1]
    slices = make_slices(val_tokens, cfg.seq_len, num_seqs, byte_table, cfg.tokens.pad)
    mine = rank_share(slices)
    block = cfg.block_size or cfg.seq_len
    results = {}
    for mode in modes:
        began = time.perf_counter()
        bits = planned_bits(model, mine, mode, order, passes=passes, tokens_per_pass=tokens_per_pass,
                            eps=cfg.noise_eps, vocab_size=cfg.vocab_size, batch_rows=cfg.eval_batch_rows,
                            device=device, block=cfg.block_size)
        scored_mask = scored_positions(torch.from_numpy(mine.tokens), mode, cfg.tokens.pad)
        per_block = scored_mask.view(len(mine), -1, block).sum(2).flatten().tolist()
        evals = sum(len(schedule.counts(n)) for n in per_block)
        total_bits, num_tokens, num_bytes, network_evals = reduce_sum(
            [bits.sum(), scored_mask.sum().item(), mine.token_bytes.sum(), evals], device)
        seconds = time.perf_counter() - began
        results[mode] = summarize(
            total_bits, int(num_tokens), int(num_bytes),
            method="planned", mode=mode, order=order,
            kind=f"{mode} exact code length ({order}, {schedule.describe()}"
                 f"{f', blocks of {block}' if cfg.block_size else ''})",
            bound=f"exact code length (planned-order decoding: {order}, {schedule.describe()}"
                  f"{f' per block of {block}' if cfg.block_size else ''}, "
                  f"each pass coded with the product of the model's marginals)", block_size=block,
            passes=network_evals / max(1, len(slices)), passes_requested=passes,
            tokens_per_pass=tokens_per_pass, network_evals=int(network_evals),
            num_seqs=len(slices), seq_len=cfg.seq_len, noise_eps=cfg.noise_eps,
            eval_seconds=seconds, world_size=world,
            seconds_per_slice_per_process=seconds * world / max(1, len(slices)),
        )
    return results
