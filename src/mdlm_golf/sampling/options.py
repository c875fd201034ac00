"""What to sample and what came out, and the canvas: [BOS, prompt..., MASK...] rows, the per-row
generators, and where documents end."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..config import BOS_ID, EOS_ID, MAX_SEQ_LEN, Config, Tokens

SAMPLERS = ("ancestral", "cached", "confidence")
MAX_SAMPLES = 1024  # one batch: every row has its own generator and its own logits at every step


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
        cfg.require_token_level("sampling")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        for name in ("num", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num > MAX_SAMPLES:
            raise ValueError(f"num must be <= {MAX_SAMPLES} (one batch), got {self.num}")
        if self.length > MAX_SEQ_LEN:
            raise ValueError(f"length must be <= {MAX_SEQ_LEN:,}, got {self.length:,}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a positive finite number, got {self.temperature} "
                             "(for greedy decoding use a tiny top_p)")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.length > cfg.seq_len and not cfg.block_size:  # block sampling goes on past it
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


def row_generators(opts: SampleOptions) -> list[torch.Generator]:
    return [torch.Generator().manual_seed((opts.seed * 1_000_003 + i) % 2**63) for i in range(opts.num)]


def initial_canvas(opts: SampleOptions, tokens: Tokens) -> torch.Tensor:
    """[num, length]: BOS, the prompt (visible, frozen), then MASK."""
    row = [BOS_ID, *opts.prompt_ids] + [tokens.mask] * (opts.length - 1 - len(opts.prompt_ids))
    return torch.tensor(row, dtype=torch.long).repeat(opts.num, 1)


def close_documents(x: torch.Tensor, tokens: Tokens, opening: bool = True) -> torch.Tensor:
    """PAD from the first BOS or EOS of each row on (after position 0 when column 0 is the row's
    `opening` BOS; a later block of the row has none): the next document starts there."""
    boundary = (x == BOS_ID) | (x == EOS_ID)
    if opening:
        boundary[:, 0] = False
    return torch.where(boundary.cumsum(1) > 0, torch.full_like(x, tokens.pad), x)


def first_pad(row: torch.Tensor, tokens: Tokens) -> int:
    pads = (row == tokens.pad).nonzero()
    return int(pads[0]) if len(pads) else row.numel()


def live_widths(x: torch.Tensor, tokens: Tokens) -> torch.Tensor:
    """Per row: positions the network must see, those before the first PAD (PAD is only a suffix)."""
    return x.size(1) - (x == tokens.pad).sum(1)


def decode_rows(sp, rows: list[list[int]]) -> list[str]:
    """Text of each sample: its ids after the leading BOS, decoded by the SentencePiece processor."""
    return [sp.decode([int(t) for t in row[1:]]) for row in rows]
