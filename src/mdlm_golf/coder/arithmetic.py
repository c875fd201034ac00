"""Witten-Neal-Cleary arithmetic coding, 32-bit low/high, bit output with pending bits.

Frequencies: freq = floor(p * (TOTAL - V)) + 1 with TOTAL = 2**20, so every token has freq >= 1
and the total stays far below the coder's minimum range (2**30). Against the float code length the
quantization costs at most ~V / TOTAL / ln 2 = 0.0014 bits per token (and saves bits on tokens the
model gave p < 2**-20: the +1 is a floor); the coder's end costs ~2 bits plus the last byte.
"""
from __future__ import annotations

import math

import numpy as np
import torch

STATE_BITS = 32
FULL = (1 << STATE_BITS) - 1
HALF = 1 << (STATE_BITS - 1)
QUARTER = 1 << (STATE_BITS - 2)
TOTAL = 1 << 20  # frequency scale; must stay well below QUARTER


def min_bits_per_symbol(vocab_size: int) -> float:
    """The least any coded token costs: its frequency is at most TOTAL - V + 1 of TOTAL (every other
    token keeps at least 1), -log2(1 - (V - 1) / TOTAL): 0.0014 bits for V = 1024."""
    return -math.log2(1.0 - (vocab_size - 1) / TOTAL)


class ArithmeticEncoder:
    """Codes symbols given as [lo, hi) of a total into a bit string."""

    def __init__(self) -> None:
        self.low, self.high, self.pending = 0, FULL, 0
        self.bits = bytearray()

    def encode(self, lo: int, hi: int, total: int) -> None:
        """Narrow to the symbol's [lo, hi) of `total`, then shift out the settled leading bits."""
        span = self.high - self.low + 1
        self.high = self.low + span * hi // total - 1
        self.low = self.low + span * lo // total
        while True:
            if self.high < HALF:
                self._emit(0)
            elif self.low >= HALF:
                self._emit(1)
                self.low -= HALF
                self.high -= HALF
            elif self.low >= QUARTER and self.high < HALF + QUARTER:
                self.pending += 1  # straddles the middle: the bit is known only later
                self.low -= QUARTER
                self.high -= QUARTER
            else:
                break
            self.low <<= 1
            self.high = (self.high << 1) | 1

    def _emit(self, bit: int) -> None:
        self.bits.append(bit)
        self.bits.extend([1 - bit] * self.pending)
        self.pending = 0

    def finish(self) -> bytes:
        """Two more bits pick a point inside [low, high] whatever zeros follow; zero bytes dropped."""
        if (self.low, self.high, self.pending, len(self.bits)) == (0, FULL, 0, 0):
            return b""  # nothing was coded
        self.pending += 1
        self._emit(0 if self.low < QUARTER else 1)
        return np.packbits(np.frombuffer(bytes(self.bits), dtype=np.uint8)).tobytes().rstrip(b"\0")


class ArithmeticDecoder:
    """Reads back the symbols an ArithmeticEncoder coded; past the end of the code it reads zeros."""

    def __init__(self, code: bytes) -> None:
        self.bits = np.unpackbits(np.frombuffer(code, dtype=np.uint8)).tolist()
        self.position = 0
        self.low, self.high, self.value = 0, FULL, 0
        for _ in range(STATE_BITS):
            self.value = (self.value << 1) | self._bit()

    def _bit(self) -> int:
        self.position += 1
        return self.bits[self.position - 1] if self.position <= len(self.bits) else 0

    def target(self, total: int) -> int:
        """Where the code value falls on the [0, total) scale of the next symbol."""
        span = self.high - self.low + 1
        return ((self.value - self.low + 1) * total - 1) // span

    def consume(self, lo: int, hi: int, total: int) -> None:
        """Narrow to the decoded symbol's [lo, hi) of `total`, as the encoder did."""
        span = self.high - self.low + 1
        self.high = self.low + span * hi // total - 1
        self.low = self.low + span * lo // total
        while True:
            if self.high < HALF:
                pass
            elif self.low >= HALF:
                self.low, self.high, self.value = self.low - HALF, self.high - HALF, self.value - HALF
            elif self.low >= QUARTER and self.high < HALF + QUARTER:
                self.low, self.high, self.value = (self.low - QUARTER, self.high - QUARTER,
                                                   self.value - QUARTER)
            else:
                break
            self.low = self.low << 1
            self.high = (self.high << 1) | 1
            self.value = (self.value << 1) | self._bit()


def cumulative_frequencies(logits: torch.Tensor, vocab_size: int) -> np.ndarray:
    """[N, V] int64 running sums of freq = floor(p (TOTAL - V)) + 1, p the float32 SUBS softmax.

    float32 p times an integer below 2**24 is exact in float64, so the floor is reproducible.
    """
    # [:, :vocab_size]: a no-op on subs_logits (what run_planned passes); model-width logits with MASK
    # and PAD at -inf give the same p
    p = torch.softmax(logits.float(), dim=-1)[:, :vocab_size].double().cpu().numpy()
    freq = np.floor(p * (TOTAL - vocab_size)).astype(np.int64) + 1
    return np.cumsum(freq, axis=1)
