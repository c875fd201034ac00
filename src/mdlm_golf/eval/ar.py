"""The autoregressive yardstick's figure, scored as the challenge's evaluator scores one: windows of
seq_len, inputs tokens[i:i+L], targets tokens[i+1:i+L+1], every target coded by the next-token law:
an exact code length, not a bound."""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from ..config import Config, Tokens
from ..data import ByteTable
from ..diffusion import masked_nll
from ..dist import autocast, rank_and_world, to_device
from ..objective import next_token_batch
from .harness import EvalSlices, make_ar_windows, rank_share, reduce_sum, summarize


@torch.no_grad()
def chain_rule_bits(model, windows: EvalSlices, tokens: Tokens, batch_rows: int, device: torch.device) -> np.ndarray:
    """Exact code length in bits of each window's L target tokens under the next-token law; float64 [S]."""
    bits = torch.zeros(len(windows), dtype=torch.float64, device=device)
    for start in range(0, len(windows), batch_rows):
        batch = next_token_batch(to_device(windows.tokens[start:start + batch_rows], device), tokens=tokens)
        with autocast(device):
            logits = model(batch.inputs, batch.sigma, batch.clean)
        nll = torch.where(batch.in_loss, masked_nll(logits, batch.targets, tokens), 0.0)
        bits[start:start + nll.size(0)] = nll.double().sum(-1) / math.log(2)
    return bits.cpu().numpy()


def evaluate_ar(model, val_tokens: np.ndarray, byte_table: ByteTable, cfg: Config, *, num_seqs: int,
                device: torch.device) -> dict:
    """The challenge's AR figure: exact bits per byte over num_seqs windows of seq_len (0 = all)."""
    world = rank_and_world()[1]
    began = time.perf_counter()
    windows = make_ar_windows(val_tokens, cfg.seq_len, num_seqs, byte_table)
    mine = rank_share(windows)
    bits = chain_rule_bits(model, mine, cfg.tokens, cfg.eval_batch_rows, device).sum()
    bits, num_tokens, num_bytes = reduce_sum([bits, mine.tokens[:, 1:].size, mine.token_bytes[:, 1:].sum()], device)
    seconds = time.perf_counter() - began
    return summarize(bits, int(num_tokens), int(num_bytes), method="chain rule", mode="ar",
                     kind="exact (AR chain rule)",
                     bound="exact code length: next-token chain rule over windows of seq_len "
                           "(inputs tokens[i:i+L], targets tokens[i+1:i+L+1])",
                     num_seqs=len(windows), seq_len=cfg.seq_len, eval_seconds=seconds, world_size=world,
                     seconds_per_slice_per_process=seconds * world / max(1, len(windows)))
