"""One reverse step over a region of the canvas: which positions are revealed, the network's SUBS
distribution there, the token draws (temperature, nucleus, confidence)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..config import Config, Tokens
from ..diffusion import reveal_weights, sigma, subs_log_probs
from ..dist import autocast
from .options import SampleOptions

# network(region [N, W], rows bool [N], sigma_k) -> logits [rows, <= W, vocab+2] of the chosen rows
Network = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


class Denoising:
    """The reverse process over a region of the canvas (all of it, or one block), and its counters."""

    def __init__(self, opts: SampleOptions, cfg: Config, generators: list[torch.Generator]):
        self.opts, self.generators, self.tokens = opts, generators, cfg.tokens
        self.weights = reveal_weights(opts.steps, cfg.noise_eps).tolist()  # [k - 1]: reveal chance at step k
        self.sigmas = sigma(torch.arange(opts.steps + 1, dtype=torch.float64) / opts.steps, cfg.noise_eps).tolist()
        self.nfe, self.row_nfe, self.positions, self.widths = 0, torch.zeros(opts.num, dtype=torch.long), 0, []

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


def run_network(model, x: torch.Tensor, rows: torch.Tensor, widths: torch.Tensor,
                sigma_k: float) -> torch.Tensor:
    """Logits [rows, W, vocab+2] for the selected rows, sliced to W = their widest live width.

    When a row is narrower than W, doc_ids put its PAD tail in a document of its own (id -1, as
    attention.document_ids does), so its document attends only to itself.
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
        return model(x_in, sigma_in, doc_ids=doc_ids)


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
