"""Partial (sub-token) masking, MDM-Prime: a token is l digits in base b = ceil(V^(1/l)) and the forward
process masks digits, so a token can be partly known. l = 1 is the plain token-level MDLM, exactly.

Input ids stay one per position, so documents, PAD and the layouts work as for tokens: a fully visible
token is its own id, a fully masked one MASK, PAD is PAD, and a partly masked token gets an id of its own
past PAD (V + 2 + its rank among the partial states). The denoiser's law over the V tokens is restricted
to the tokens whose digits agree with the visible ones; the loss at a masked digit is -log of the true
digit's marginal under that law. Every masked digit of a row weighs w(t) = 1/t, as a masked token does.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

from .config import Tokens
from .diffusion import Uniforms, mask_tokens, masked_nll, subs_logits, uniforms


class DigitCode:
    """The digits of a vocabulary's tokens (l digits, base b) and the partial states they can be in."""

    def __init__(self, vocab_size: int, digits: int):
        self.tokens, self.digits = Tokens(vocab_size), digits
        self.base = math.ceil(round(vocab_size ** (1.0 / digits), 9))
        if self.base ** digits < vocab_size:  # float rounding of the root
            self.base += 1
        places = self.base ** torch.arange(digits - 1, -1, -1)
        self.token_digits = torch.arange(vocab_size)[:, None] // places % self.base  # [V, l]
        self.state_digits, self.state_of = self.partial_states(places)

    def partial_states(self, places: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(digit states [num ids, l] of every input id, the masked digit being b; the input id of every
        digit-state vector, indexed by its base-(b+1) number)."""
        b, l, vocab = self.base, self.digits, self.tokens.vocab_size
        every = torch.arange((b + 1) ** l)[:, None] // (b + 1) ** torch.arange(l - 1, -1, -1) % (b + 1)
        masked = every == b
        partial = masked.any(1) & ~masked.all(1)
        state_of = torch.full(((b + 1) ** l,), -1, dtype=torch.long)  # digit combinations no token has: -1
        visible = ~masked.any(1)
        value = (every * places).sum(1)
        state_of[visible & (value < vocab)] = value[visible & (value < vocab)]
        state_of[masked.all(1)] = self.tokens.mask
        state_of[partial] = self.tokens.pad + 1 + torch.arange(int(partial.sum()))
        specials = torch.stack([torch.full((l,), b), torch.full((l,), b)])  # MASK, PAD: nothing visible
        state_digits = torch.cat([self.token_digits, specials, every[partial]])
        return state_digits, state_of

    @property
    def num_ids(self) -> int:
        """Input ids a model of this code reads: the tokens, MASK, PAD and the partial states."""
        return self.state_digits.size(0)

    def mask(self, x0: torch.Tensor, p_mask: torch.Tensor, maskable: torch.Tensor,
             mask_u: Uniforms) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, positions with a masked digit): each digit of each maskable position masked with
        probability p_mask[row]; mask_u holds [B, L] uniforms (l = 1) or [B, L, l]."""
        if self.digits == 1:
            return mask_tokens(x0, p_mask, maskable, self.tokens.mask, mask_u)
        shape = (*x0.shape, self.digits)
        masked = (uniforms(shape, mask_u, x0.device) < p_mask[:, None, None]) & maskable[..., None]
        return self.apply(x0, masked)

    def apply(self, x0: torch.Tensor, masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, positions with a masked digit) for given masked positions [B, L] (l = 1) or digits [B, L, l]."""
        if self.digits == 1:
            return torch.where(masked, torch.full_like(x0, self.tokens.mask), x0), masked
        digits = self.token_digits.to(x0.device)[x0.clamp(max=self.tokens.vocab_size - 1)]
        number = (torch.where(masked, self.base, digits) * (self.base + 1) ** torch.arange(
            self.digits - 1, -1, -1, device=x0.device)).sum(-1)
        in_loss = masked.any(-1)
        return torch.where(in_loss, self.state_of.to(x0.device)[number], x0), in_loss

    def nll(self, logits: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """-log p in nats [B, L] of x0's masked part given x_t: the token's SUBS NLL (l = 1), else the sum
        over masked digits of -log their true value's marginal under the token law restricted to the
        tokens consistent with the visible digits (0 where nothing is masked)."""
        if self.digits == 1:
            return masked_nll(logits, x0, self.tokens)
        vocab = self.tokens.vocab_size
        states = self.state_digits.to(x_t.device)[x_t]  # [B, L, l], b = masked
        table = self.token_digits.to(x_t.device)  # [V, l]
        visible = states != self.base
        agrees = (table[None, None] == states[:, :, None]) | ~visible[:, :, None]  # [B, L, V, l]
        consistent = torch.where(agrees.all(-1), subs_logits(logits, self.tokens), -math.inf)  # [B, L, V]
        truth = table[x0.clamp(max=vocab - 1)]  # [B, L, l]
        matches = table.T[None, None] == truth[..., None]  # [B, L, l, V]: the true value at digit j
        numerator = torch.logsumexp(consistent[:, :, None].masked_fill(~matches, -math.inf), -1)
        per_digit = torch.logsumexp(consistent, -1)[..., None] - numerator
        return torch.where(visible, 0.0, per_digit).sum(-1)

    def terminal_bits_per_token(self) -> float:
        """Bits to code a token's digits still visible at t = 1 uniformly, per visible-at-the-end share:
        l log2 b (log2 V when b^l = V)."""
        return self.digits * math.log2(self.base)


@lru_cache(maxsize=8)
def digit_code(vocab_size: int, digits: int) -> DigitCode:
    """The (cached, immutable) digit code of a vocabulary. Its tables are built on the CPU whatever the
    caller's default device: a model built under torch.device("meta") for a shape check still needs them."""
    with torch.device("cpu"):
        return DigitCode(vocab_size, digits)
