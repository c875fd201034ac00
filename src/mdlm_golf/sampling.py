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

import torch
import torch.nn.functional as F

from .config import BOS_ID, Config
from .diffusion import Tokens, reveal_weights, sigma, suppress_special

EOS_ID = 2  # the challenge tokenizer's </s>; a revealed one ends the document like BOS
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
        if self.length > cfg.seq_len:
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
             seed: int = 0, device: torch.device | str = "cpu") -> SampleResult:
    """Sample `num` documents of at most `length` ids (BOS included) in at most `steps` forwards."""
    opts = SampleOptions(num, length, steps, sampler, tuple(int(t) for t in prompt_ids or ()),
                         float(temperature), float(top_p), int(seed))
    opts.check(cfg)
    if cfg.objective == "ar":
        return generate_left_to_right(model, cfg, opts, torch.device(device))
    tokens, device = Tokens(cfg.vocab_size), torch.device(device)
    x = initial_canvas(opts, tokens).to(device)
    generators = row_generators(opts)
    weights = reveal_weights(steps, cfg.noise_eps).tolist()  # weights[k - 1]: reveal chance at step k
    sigmas = sigma(torch.arange(steps + 1, dtype=torch.float64) / steps, cfg.noise_eps).tolist()
    nfe, row_nfe, positions, widths = 0, torch.zeros(num, dtype=torch.long), 0, []
    start = time.perf_counter()
    with torch.inference_mode():
        for k in range(steps, 0, -1):
            masked = x == tokens.mask
            active = masked.any(1)
            if not bool(active.any()):
                break  # every row is fully revealed (boundaries or confidence rounding)
            if sampler == "confidence":
                pick, rows = masked, active
            else:
                u = torch.stack([torch.rand(length, generator=g) for g in generators]).to(device)
                pick = masked & (u < weights[k - 1])
                rows = active if sampler == "ancestral" else pick.any(1)
                if not bool(rows.any()):
                    continue  # lazy: nothing revealed, so no logits are needed
            logits = run_network(model, x, rows, live_widths(x, tokens), sigmas[k])
            nfe, positions = nfe + 1, positions + int(rows.sum()) * logits.size(1)
            row_nfe += rows.cpu()
            widths.append(logits.size(1))
            reveal_tokens(x, pick, rows, logits, weights[k - 1], generators, opts, tokens)
            x = close_documents(x, tokens)
        canvas = x.cpu()
    elapsed = time.perf_counter() - start
    assert not bool((canvas == tokens.mask).any()), "a MASK survived the last step"
    rows_out = [row[: first_pad(row, tokens)].tolist() for row in canvas]
    generated = sum(len(r) - 1 - len(opts.prompt_ids) for r in rows_out)
    return SampleResult(rows_out, canvas, opts, nfe, row_nfe.tolist(), positions, generated, elapsed, widths)


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
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
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
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
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
    log_p = F.log_softmax(suppress_special(logits, tokens), dim=-1)[:, : tokens.vocab_size]
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
