"""The evaluation harness every figure goes through: fixed val slices (or the AR windows), the exact
bytes of each token, which positions are scored, the one-line and JSON summaries of a figure.

Slices are fixed contiguous windows of the val stream; bytes come from the challenge's own rule
(ByteTable), so the figure is right to the byte. An MDLM has two modes:
  strict   every token of the slice is masked and scored: bounds the code length of the whole stream
  anchored BOS tokens are given (never masked, never scored), as in the document-learning submission
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from ..config import BOS_ID
from ..data import ByteTable
from ..dist import all_reduce_sum, dist_backend_needs_device, rank_and_world

MODES = ("strict", "anchored")
EXACT = "exact"  # the suffix of a mode's exact (planned) figure beside its ELBO: "strict exact"
HEADLINE_MODES = ("strict",)  # the figure a run is judged by (an AR run has one figure, "ar")
LEGACY_BYTES_PER_TOKEN = 4.3  # the constant an earlier published diffusion result divided by


@dataclass
class EvalSlices:
    """Contiguous val slices: tokens [S, L] (PAD after the stream ends), bytes per token [S, L]."""

    tokens: np.ndarray
    token_bytes: np.ndarray
    index: np.ndarray  # global slice numbers: they seed the mask draws

    def __len__(self) -> int:
        return self.index.size

    def subset(self, rows: np.ndarray | slice) -> "EvalSlices":
        return EvalSlices(self.tokens[rows], self.token_bytes[rows], self.index[rows])


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode for the block, back in the mode it had after it, even if evaluation raises."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def rank_share(slices: EvalSlices) -> EvalSlices:
    """This process's slices under torchrun: rank r takes slices r, r + world, ... (all of them alone)."""
    rank, world = rank_and_world()
    return slices.subset(np.arange(rank, len(slices), world))


def reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Each value summed over the ranks, in float64 (on the device only where NCCL needs it)."""
    totals = torch.tensor(list(values), dtype=torch.float64, device=device if dist_backend_needs_device() else "cpu")
    return all_reduce_sum(totals).tolist()


def make_slices(val_tokens: np.ndarray, seq_len: int, num_seqs: int, byte_table: ByteTable,
                pad_id: int) -> EvalSlices:
    """Slice i = val[i*L:(i+1)*L]; num_seqs=0 takes the whole split (the last slice PAD-filled)."""
    total = -(-val_tokens.size // seq_len)
    count = total if num_seqs == 0 else min(num_seqs, total)
    stream = val_tokens[: count * seq_len].astype(np.int64)
    per_token = byte_table.stream_bytes(stream)  # predecessor of slice i's first token is in slice i-1
    fill = count * seq_len - stream.size
    tokens = np.concatenate([stream, np.full(fill, pad_id, dtype=np.int64)]).reshape(count, seq_len)
    token_bytes = np.concatenate([per_token, np.zeros(fill, dtype=np.int64)]).reshape(count, seq_len)
    return EvalSlices(tokens, token_bytes, np.arange(count))


def make_ar_windows(val_tokens: np.ndarray, seq_len: int, num_seqs: int, byte_table: ByteTable) -> EvalSlices:
    """Window i = val[i*L : i*L + L + 1]: L inputs, L targets (the challenge's AR evaluation);
    only whole windows, num_seqs=0 takes all. token_bytes[:, 0] belongs to the input-only token."""
    total = (val_tokens.size - 1) // seq_len
    count = total if num_seqs == 0 else min(num_seqs, total)
    stream = val_tokens[: count * seq_len + 1].astype(np.int64)
    per_token = byte_table.stream_bytes(stream)
    index = np.arange(count)[:, None] * seq_len + np.arange(seq_len + 1)[None]
    return EvalSlices(stream[index], per_token[index], np.arange(count))


def scored_positions(tokens: torch.Tensor, mode: str, pad_id: int) -> torch.Tensor:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    scored = tokens != pad_id
    return scored & (tokens != BOS_ID) if mode == "anchored" else scored


def headline(results: dict[str, dict]) -> dict:
    """The figure a run is judged by: the exact figure of an AR model; for a masked-diffusion model the
    smaller of its strict ELBO bound and, where evaluate() computed one, its exact strict code length."""
    if "ar" in results:
        return results["ar"]
    return min((results[k] for k in ("strict", f"strict {EXACT}") if k in results), key=lambda r: r["bpb"])


def summarize(bits: float, tokens: int, num_bytes: int, **fields) -> dict:
    """The JSON record of one figure: what it is, how it was computed, and the numbers."""
    if not math.isfinite(bits):  # every figure goes through here: ELBO, AR chain rule, planned decoding
        raise FloatingPointError(f"{fields.get('mode', 'eval')} bpb is {bits / max(num_bytes, 1)}: "
                                 f"the model's weights or logits are not finite")
    return {
        **fields,
        "bits": bits,
        "tokens": tokens,
        "bytes": num_bytes,
        "bits_per_token": bits / tokens,
        "bytes_per_token": num_bytes / tokens,
        "bpb": bits / num_bytes,
        "bpb_legacy_4p3": bits / (tokens * LEGACY_BYTES_PER_TOKEN),
    }


def projected_seconds(result: dict, total_tokens: int, processes: int = 8) -> float:
    """Wall time the whole split would take on `processes` devices like this one, from the measured rate."""
    slices = -(-total_tokens // result["seq_len"])
    return result["seconds_per_slice_per_process"] * slices / processes


def format_result(r: dict) -> str:
    """One line that says what the number is: exact or a bound, how it was computed, on what."""
    if r["method"] == "chain rule":
        return (f"ar       bpb {r['bpb']:.4f} ({r['bits_per_token']:.4f} bits/token, exact chain-rule code "
                f"length, {r['num_seqs']} windows x {r['seq_len']} = {r['tokens']:,} scored tokens, "
                f"{r['bytes']:,} bytes, {r['bytes_per_token']:.3f} bytes/token)")
    shared = (f"{r['num_seqs']} slices x {r['seq_len']} = {r['tokens']:,} scored tokens, {r['bytes']:,} bytes, "
              f"{r['bytes_per_token']:.3f} bytes/token; legacy /4.3 shortcut {r['bpb_legacy_4p3']:.4f})")
    if r["method"] == "planned":
        blocks = f" in blocks of {r['block_size']}" if r["block_size"] < r["seq_len"] else ""
        return (f"{r['mode']:8s} bpb {r['bpb']:.4f} ({r['bits_per_token']:.4f} bits/token, exact planned-order "
                f"code length, {r['order']}{blocks}, {r['passes']:g} network evals/slice "
                f"({r['passes'] / r['seq_len']:.3g}/token), " + shared)
    spread = f" ± {r['bpb_stderr']:.4f} (s.e., {r['draws']} draws)" if r.get("bpb_stderr") else ""
    blocks = f" in blocks of {r['block_size']}" if r.get("block_size", r["seq_len"]) < r["seq_len"] else ""
    return (f"{r['mode']:8s} bpb {r['bpb']:.4f}{spread} ({r['bits_per_token']:.4f} bits/token, "
            f"{r['elbo_steps']}-step ELBO upper bound{blocks}, " + shared)


def format_headline(results: dict[str, dict]) -> str:
    """The line naming the figure a run is judged by, exact or an upper bound."""
    r = headline(results)
    exact = r["method"] != "elbo"
    return f"headline bpb {r['bpb']:.4f}: {r['kind']} ({'exact' if exact else 'upper bound'})"
