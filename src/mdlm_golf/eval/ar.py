"""The autoregressive yardstick's figure, scored as the challenge's evaluator scores one: windows of
seq_len, inputs tokens[i:i+L], targets tokens[i+1:i+L+1], every target coded by the next-token law:
an exact code length, not a bound."""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from ..config import Config
from ..data import ByteTable
from ..dist import all_reduce_sum, autocast, dist_backend_needs_device, rank_and_world, to_device
from ..objective import ar_nll
from .harness import EvalSlices, make_ar_windows, summarize


@torch.no_grad()
def chain_rule_bits(model, windows: EvalSlices, pad_id: int, vocab_size: int, batch_rows: int,
                    device: torch.device) -> np.ndarray:
    """Exact code length in bits of each window's L target tokens under the next-token law; float64 [S]."""
    bits = torch.zeros(len(windows), dtype=torch.float64, device=device)
    for start in range(0, len(windows), batch_rows):
        rows = slice(start, start + batch_rows)
        x = to_device(windows.tokens[rows], device)
        with autocast(device):
            nll, _ = ar_nll(model, x, pad_id, vocab_size)
        bits[start:start + x.size(0)] = nll.double().sum(-1) / math.log(2)
    return bits.cpu().numpy()


def evaluate_ar(model, val_tokens: np.ndarray, byte_table: ByteTable, cfg: Config, *, num_seqs: int,
                device: torch.device) -> dict:
    """The challenge's AR figure: exact bits per byte over num_seqs windows of seq_len (0 = all)."""
    rank, world = rank_and_world()
    began = time.perf_counter()
    windows = make_ar_windows(val_tokens, cfg.seq_len, num_seqs, byte_table)
    mine = windows.subset(np.arange(rank, len(windows), world))
    bits = chain_rule_bits(model, mine, cfg.pad_id, cfg.vocab_size, cfg.eval_batch_rows, device).sum()
    totals = torch.tensor([bits, mine.tokens[:, 1:].size, mine.token_bytes[:, 1:].sum()], dtype=torch.float64,
                          device=device if dist_backend_needs_device() else "cpu")
    bits, num_tokens, num_bytes = all_reduce_sum(totals).tolist()
    seconds = time.perf_counter() - began
    return summarize(bits, int(num_tokens), int(num_bytes), method="chain rule", mode="ar",
                     kind="exact (AR chain rule)",
                     bound="exact code length: next-token chain rule over windows of seq_len "
                           "(inputs tokens[i:i+L], targets tokens[i+1:i+L+1])",
                     num_seqs=len(windows), seq_len=cfg.seq_len, eval_seconds=seconds, world_size=world,
                     seconds_per_slice_per_process=seconds * world / max(1, len(windows)))
