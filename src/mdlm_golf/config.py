"""The one configuration dataclass, its presets, and how flags and env vars map onto it."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from .files import write_text_atomic

# The special ids, all here. The challenge tokenizer's own: every document of the shards starts with
# BOS; EOS ends a sampled document like BOS; UNK is what characters outside the vocabulary become.
BOS_ID = 1
EOS_ID = 2
UNK_ID = 3


@dataclass(frozen=True)
class Tokens:
    """The ids this project adds to a vocabulary: MASK and PAD sit just past the real tokens."""

    vocab_size: int

    @property
    def mask(self) -> int:
        return self.vocab_size

    @property
    def pad(self) -> int:
        return self.vocab_size + 1


# docs: one document (window) per row, PAD after it; packed: contiguous stream windows holding several
# documents, attention kept inside each; stream: contiguous windows, boundaries maskable like any token
LAYOUTS = ("docs", "packed", "stream")
# mdlm: masked diffusion (the ELBO); ar: the same transformer, causal, next-token cross-entropy (the yardstick)
OBJECTIVES = ("mdlm", "ar")
# muon: Newton-Schulz-orthogonalized momentum for the 2-D hidden matrices, AdamW for the rest
OPTIMIZERS = ("adamw", "muon")
# antithetic: pairs (u, 1 - u); stratified: one time in each of the batch's n strata of [0, 1)
TIME_SAMPLINGS = ("antithetic", "stratified")
# how a sub-token model reads a partly masked token: the sum of its digit slots' embeddings; the same but
# a fully visible token's own row; or the slots' narrower embeddings concatenated and merged by a Linear
SUBTOKEN_MERGES = ("sum", "token", "concat")
# elbo: w(t) = 1/t, the continuous-time ELBO; flat: w = 1 (the same optimum, a different emphasis over t)
LOSS_WEIGHTS = ("elbo", "flat")


MAX_VOCAB = 65535 - 2  # shards hold uint16 ids, and MASK and PAD take the two ids after the vocabulary
MAX_SEED = 2**32 - 1
# Shapes no real run reaches (the reference model: 11 layers, width 512, seq 2048), so a config read from
# a file (a checkpoint's, an artifact's, a saved run's) that claims more is refused before anything is
# allocated for it, by the same range check as a flag
MAX_SEQ_LEN = 1 << 20
MAX_LAYERS = 1024
MAX_WIDTH = 1 << 16  # model_dim, cond_dim
MAX_ROWS = 1 << 20  # rows of a batch or an evaluation forward
POSITIVE_INTS = ("num_layers", "model_dim", "num_heads", "mlp_mult", "cond_dim", "seq_len", "batch_rows",
                 "grad_accum", "steps", "shards_per_group", "elbo_steps", "eval_batch_rows", "log_every")
COUNTS = ("global_batch_rows", "warmup_steps", "warmdown_steps", "batches_per_group", "eval_num_seqs",
          "val_every", "checkpoint_every", "block_size", "decoder_layers", "time_warmup_steps",
          "loss_warmup_steps")
# (low, high, low included, high included) of every numeric field
RANGES: dict[str, tuple[float, float, bool, bool]] = {
    **{name: (1, math.inf, True, False) for name in POSITIVE_INTS},
    **{name: (0, math.inf, True, False) for name in COUNTS},
    "vocab_size": (2, MAX_VOCAB, True, True),
    "seed": (0, MAX_SEED, True, True),
    "lr": (0, math.inf, False, False),
    "muon_lr": (0, math.inf, False, False),
    "grad_clip": (0, math.inf, False, False),
    "weight_decay": (0, math.inf, True, False),
    "max_wallclock": (0, math.inf, True, False),  # 0 = no cap
    "ema": (0, 1, True, False),
    "noise_eps": (0, 1, False, False),
    "anchor_mask_prob": (0, 1, True, True),
    "subtokens": (1, math.inf, True, False),
    **{name: (1, bound, True, True) for name, bound in (
        ("seq_len", MAX_SEQ_LEN), ("num_layers", MAX_LAYERS), ("model_dim", MAX_WIDTH), ("cond_dim", MAX_WIDTH),
        ("num_heads", MAX_WIDTH), ("mlp_mult", 64), ("batch_rows", MAX_ROWS), ("eval_batch_rows", MAX_ROWS),
        ("elbo_steps", MAX_SEQ_LEN))},
    "decoder_layers": (0, MAX_LAYERS, True, True),
    "init_std": (0, 1, False, True),
    "time_warmup_start": (0, 1, False, True),
}


def describe_range(low: float, high: float, low_in: bool, high_in: bool) -> str:
    """'>= 1', '> 0' or 'in [0, 1)'."""
    if high == math.inf:
        return f"{'>=' if low_in else '>'} {low}"
    return f"in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"


def in_range(value: float, low: float, high: float, low_in: bool, high_in: bool) -> bool:
    """Whether value is finite and between the bounds (each included or not)."""
    return (math.isfinite(value) and (value >= low if low_in else value > low)
            and (value <= high if high_in else value < high))


def check_field(name: str, value: Any, kind: type) -> None:
    """A ValueError naming the field unless value has its type (an int will do for a float) and range."""
    fits = isinstance(value, kind) if kind in (bool, str) else (
        isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool))
    if not fits:
        raise ValueError(f"{name} must be {kind.__name__}, got {value!r}")
    if name in RANGES and not in_range(value, *RANGES[name]):
        raise ValueError(f"{name} must be {describe_range(*RANGES[name])}, got {value!r}")


@dataclass(frozen=True)
class Config:
    """Reference configuration (the challenge's seed MDLM); every field is a flag and an env var.

    Frozen: a changed config is a new one (dataclasses.replace), so a model, a run and its evaluation
    never see a field change under them.
    """

    # model
    vocab_size: int = 1024
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    mlp_mult: int = 3
    cond_dim: int = 128
    seq_len: int = 2048
    objective: str = "mdlm"  # one of OBJECTIVES
    time_cond: bool = True  # condition on the noise level (adaLN); an ar model never is
    # optimisation
    batch_rows: int = 8  # rows per micro-batch (per process)
    grad_accum: int = 4
    global_batch_rows: int = 0  # rows per optimizer step over all processes; 0 = batch_rows x grad_accum x world
    steps: int = 6000
    lr: float = 6e-4  # AdamW's (every parameter with adamw; embeddings, head and gains with muon)
    optimizer: str = "adamw"  # one of OPTIMIZERS
    muon_lr: float = 0.02  # Muon's, for the 2-D hidden matrices
    ema: float = 0.0  # decay of an exponential moving average of the weights (0 = none): eval/export/sample use it
    warmup_steps: int = 300
    warmdown_steps: int = 1500
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    max_wallclock: float = 0.0  # seconds of training time; 0 = no cap
    # diffusion
    noise_eps: float = 1e-3
    layout: str = "packed"  # one of LAYOUTS
    anchor_mask_prob: float = 0.0
    time_sampling: str = "antithetic"  # one of TIME_SAMPLINGS: how a batch's diffusion times are drawn
    # early training (the plateau levers, BENCHMARKS.md): for the first time_warmup_steps steps the diffusion
    # times are scaled into [0, m], m rising linearly from time_warmup_start to 1 (fewer near-fully-masked
    # rows while nothing is learned yet); loss_weight for the first loss_warmup_steps steps (0 = always)
    time_warmup_steps: int = 0
    time_warmup_start: float = 1.0
    loss_weight: str = "elbo"  # one of LOSS_WEIGHTS
    loss_warmup_steps: int = 0
    init_std: float = 0.02  # std of the weights' normal init (embeddings and Linears; adaLN and head start at 0)
    # partial masking (MDM-Prime): a token is `subtokens` digits in base ceil(V^(1/subtokens)), masked
    # digit by digit; 1 = the token-level MDLM
    subtokens: int = 1
    subtoken_merge: str = "sum"  # one of SUBTOKEN_MERGES
    # block diffusion (BD3-LM): rows are cut into blocks of block_size tokens, each denoised given the
    # clean blocks before it; 0 = one block per row (the plain MDLM; seq_len is read as 0), 1 =
    # autoregressive code lengths
    block_size: int = 0
    # encoder-decoder block diffusion (E2D2): with block_size, the model's layers encode the clean tokens
    # (block-causal) and a decoder of decoder_layers layers denoises each noisy block from its own tokens
    # and the encoder's features of the clean blocks before it; 0 = the one [x_t ; x_0] forward
    decoder_layers: int = 0
    decoder_tied: bool = False  # the decoder reuses the top decoder_layers encoder layers (no new weights)
    # data loading
    shards_per_group: int = 2  # train shards held in memory at a time
    batches_per_group: int = 0  # batches served per group before rotating; 0 = cover its tokens once
    # evaluation
    elbo_steps: int = 128
    eval_num_seqs: int = 500  # 0 = the whole val split
    eval_batch_rows: int = 32  # (slice, step) rows per evaluation forward
    val_every: int = 0  # steps between val figures during training (same eval, off the clock); 0 = none
    # bookkeeping
    seed: int = 1337
    log_every: int = 10
    compile: bool = False  # torch.compile the training objective and the evaluation forward
    checkpoint_every: int = 0  # steps between resumable checkpoints (RUN/checkpoint.pt); 0 = none

    def __post_init__(self) -> None:
        self.validate()
        if self.block_size == self.seq_len:  # one block per row is the plain MDLM: one spelling of it
            object.__setattr__(self, "block_size", 0)

    def validate(self) -> None:
        """Every field's type and range, one ValueError naming the field and what it accepts."""
        for f in fields(self):
            check_field(f.name, getattr(self, f.name), type(f.default))
        for name, choices in (("layout", LAYOUTS), ("objective", OBJECTIVES), ("optimizer", OPTIMIZERS),
                              ("time_sampling", TIME_SAMPLINGS), ("subtoken_merge", SUBTOKEN_MERGES),
                              ("loss_weight", LOSS_WEIGHTS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.model_dim % self.num_heads or (self.model_dim // self.num_heads) % 2:
            raise ValueError(
                f"model_dim {self.model_dim} must split into {self.num_heads} heads of even size"
            )
        if self.block_size and (self.block_size > self.seq_len or self.seq_len % self.block_size):
            raise ValueError(f"block_size {self.block_size} must divide seq_len {self.seq_len}")
        if self.block_size and self.autoregressive:
            raise ValueError("block_size is for objective mdlm (an ar model is causal already)")
        if self.subtokens > math.log2(self.vocab_size):
            raise ValueError(f"subtokens must be at most log2(vocab_size) = {math.log2(self.vocab_size):g} "
                             f"(binary digits), got {self.subtokens}")
        if self.subtokens > 1 and (self.autoregressive or self.block_size):
            raise ValueError("subtokens is for the plain MDLM (objective mdlm, no block_size)")
        if self.decoder_layers and not 0 < self.block_size < self.seq_len:
            raise ValueError(f"decoder_layers {self.decoder_layers} needs block diffusion: a block_size "
                             f"below seq_len {self.seq_len}")
        if self.decoder_tied and self.decoder_layers > self.num_layers:
            raise ValueError(f"decoder_tied reuses encoder layers: decoder_layers {self.decoder_layers} must be "
                             f"at most num_layers {self.num_layers}")

    @property
    def autoregressive(self) -> bool:
        """Whether this is the AR yardstick (causal, next-token) rather than a masked-diffusion model."""
        return self.objective == "ar"

    @property
    def encoder_decoder(self) -> bool:
        """Whether block diffusion runs as an encoder of the clean tokens and a decoder of the noisy ones."""
        return self.decoder_layers > 0

    @property
    def noise_conditioned(self) -> bool:
        """Whether the model sees the noise level: an MDLM with time_cond; never an AR model."""
        return self.time_cond and not self.autoregressive

    def require_token_level(self, what: str) -> None:
        """ValueError unless the model is token-level: `what` (planned decoding, the coder, sampling) does
        not handle sub-token models yet (they are an experiment until one wins: BENCHMARKS.md)."""
        if self.subtokens > 1:
            raise ValueError(f"{what} does not take a sub-token model (subtokens {self.subtokens}) yet; "
                             f"its `eval` (the ELBO) does")

    @property
    def tokens(self) -> Tokens:
        """The special ids of this vocabulary (MASK, PAD): the one place callers read them from."""
        return Tokens(self.vocab_size)

    @property
    def num_real_rows(self) -> int:
        """Token ids the model can see: the vocabulary, MASK and PAD."""
        return self.vocab_size + 2

    @property
    def embed_rows(self) -> int:
        """Embedding rows, padded to a multiple of 64 for fast matmuls (1026 -> 1088)."""
        return -(-self.num_real_rows // 64) * 64

    @property
    def tokens_per_step(self) -> int:
        return self.batch_rows * self.grad_accum * self.seq_len

    def for_world(self, world_size: int) -> "Config":
        """This config with grad_accum set so the global batch is global_batch_rows on world_size processes."""
        if not self.global_batch_rows:
            return self
        per_step = self.batch_rows * world_size
        if self.global_batch_rows % per_step:
            raise ValueError(f"global_batch_rows {self.global_batch_rows} is not a multiple of "
                             f"batch_rows {self.batch_rows} x {world_size} processes")
        return dataclasses.replace(self, grad_accum=self.global_batch_rows // per_step)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")


# What the race found to help at the demo shape (BENCHMARKS.md): Muon for the hidden matrices, and every
# BOS maskable so strict evaluation's masked boundaries were seen in training.
BEST_RECIPE: dict[str, Any] = dict(optimizer="muon", anchor_mask_prob=1.0)
# what shortened the MDLM's early plateau (issue 22, BENCHMARKS.md: each lever raced at 300 and 600 steps,
# chosen on tuning slices): the flat loss weight (every masked token weighs 1, not 1/t; eval is unchanged)
# and, for the first 150 steps, diffusion times scaled into [0, m], m rising from 0.3 to 1
EARLY_RECIPE: dict[str, Any] = dict(loss_weight="flat", time_warmup_steps=150, time_warmup_start=0.3)
# Presets only name the fields they change; everything else keeps the reference default.
PRESETS: dict[str, dict[str, Any]] = {
    "seed": {},
    # the challenge's 10-minute budget, the race's best recipe (Muon, maskable BOS), at a shape whose
    # `export` (quant auto) fits 16 MB with room to spare: no adaLN projections (time_cond false) and
    # 9 layers instead of 11 (BENCHMARKS.md: shape vs precision). Scored as the challenge scores: the
    # whole val split, at the ELBO steps whose projected time on 8 H100s fits the evaluation budget
    # (bench/eval_budget.py; the record script checks it with a timed probe and cuts the steps if not)
    "record": dict(max_wallclock=600.0, num_layers=9, time_cond=False, eval_num_seqs=0, elbo_steps=128,
                   **BEST_RECIPE, **EARLY_RECIPE),
    # a few CPU minutes whatever the machine: the wall-clock cap ends training if steps do not
    "demo": dict(num_layers=4, model_dim=128, num_heads=4, cond_dim=64, seq_len=256,
                 batch_rows=16, grad_accum=1, steps=300, lr=2e-3, warmup_steps=30,
                 warmdown_steps=100, max_wallclock=150.0, layout="packed", elbo_steps=32,
                 eval_num_seqs=32, eval_batch_rows=64, log_every=20, **BEST_RECIPE, **EARLY_RECIPE),
    "tiny": dict(num_layers=2, model_dim=64, num_heads=2, cond_dim=32, seq_len=64,
                 batch_rows=8, grad_accum=1, steps=20, lr=3e-3, warmup_steps=5,
                 warmdown_steps=5, elbo_steps=8, eval_num_seqs=4, eval_batch_rows=32,
                 log_every=5),
}


def field_types() -> dict[str, type]:
    return {f.name: type(f.default) for f in fields(Config)}


def parse_value(name: str, raw: str) -> Any:
    """Turn a flag or env-var string into the field's type, with a message naming the field."""
    kind = field_types()[name]
    if kind is bool:
        if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ValueError(f"{name}: cannot read {raw!r} as a boolean (true/false)")
        return raw.lower() in ("1", "true", "yes", "on")
    try:
        value = float(raw) if kind in (int, float) else raw
    except ValueError:
        raise ValueError(f"{name}: cannot read {raw!r} as {kind.__name__}") from None
    if kind in (int, float) and not math.isfinite(value):
        raise ValueError(f"{name}: {raw!r} is not a finite number")
    if kind is int and value != int(value):
        raise ValueError(f"{name}: {raw!r} is not a whole number")
    return kind(value)


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """The challenge's style: NUM_LAYERS=11 SEQ_LEN=2048 ... set config fields."""
    return {name: parse_value(name, environ[name.upper()])
            for name in field_types() if name.upper() in environ}


def build_config(preset: str | None = None, environ: Mapping[str, str] | None = None,
                 overrides: Mapping[str, Any] | None = None) -> Config:
    """Reference defaults < preset < environment variables < explicit overrides (CLI flags)."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    values: dict[str, Any] = dict(PRESETS.get(preset or "seed", {}))
    values.update(env_overrides(os.environ if environ is None else environ))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return Config(**values)


def with_defaults(values: Mapping[str, Any]) -> dict[str, Any]:
    """A saved config's fields, with the default for each field added since it was written (the
    default is the behaviour that run had), so old runs compare equal to their rebuilt Config."""
    return {**{f.name: f.default for f in fields(Config)}, **values}


def config_from_dict(values: Mapping[str, Any], source: str) -> Config:
    """Rebuild a saved config; unknown or missing fields name the file they came from."""
    known = field_types()
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{source}: unknown config fields {unknown}")
    return Config(**dict(values))
