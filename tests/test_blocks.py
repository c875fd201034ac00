"""Block diffusion (--block-size B): blocks left to right, each denoised given the clean blocks before it."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from mdlm_golf.attention import block_attention_mask, block_document_ids
from mdlm_golf.coder import compress_tokens, decompress_tokens
from mdlm_golf.config import BOS_ID, Config, build_config
from mdlm_golf.diffusion import subs_log_probs
from mdlm_golf.eval.harness import make_slices
from mdlm_golf.eval.planned import planned_bits
from mdlm_golf.model import Transformer
from mdlm_golf.sampling import SAMPLERS, generate


class EveryByte:
    """A byte table where every token is one byte (the ELBO's bits do not depend on it)."""

    def stream_bytes(self, tokens: np.ndarray) -> np.ndarray:
        return np.ones(tokens.size, dtype=np.int64)


def random_model(block_size: int, layout: str = "packed", seq_len: int = 32, **overrides) -> Transformer:
    """The tiny shape with weights large enough that every position's logits depend on its context."""
    cfg = build_config("tiny", overrides=dict(seq_len=seq_len, block_size=block_size, layout=layout, **overrides))
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model.eval()


def with_block(model: Transformer, block_size: int) -> Transformer:
    """The same weights read as a model with another block size."""
    other = Transformer(dataclasses.replace(model.cfg, block_size=block_size))
    other.load_state_dict(model.state_dict())
    return other.eval()


def docs_rows(rows: int, length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(4, 1000, (rows, length), generator=gen)
    x[:, 0] = BOS_ID
    x[:, length // 3] = BOS_ID  # a second document inside every row
    return x


# ---------------------------------------------------------------- B = seq_len is today's MDLM

def test_block_size_seq_len_is_the_plain_mdlm_with_one_name():
    """One block per row is the plain MDLM: block_size seq_len is read as 0, so nothing downstream
    can tell them apart (the config, the model, the loss, the eval)."""
    assert Config(seq_len=64, block_size=64) == Config(seq_len=64, block_size=0)
    assert Config(seq_len=64, block_size=64).block_size == 0
    assert Config(seq_len=64, block_size=16).block_size == 16


def test_the_two_half_forward_with_one_block_equals_the_plain_forward():
    """A block model fed rows of one block (length B) runs the [x_t ; x_0] forward over one block:
    the plain forward of the same weights, to float rounding."""
    model = random_model(8)
    plain = with_block(model, 0)
    x0 = docs_rows(3, 8, seed=3)
    x_t = torch.where(torch.rand(x0.shape, generator=torch.Generator().manual_seed(4)) < 0.5, model.cfg.tokens.mask, x0)
    sigma = torch.tensor([0.3, 1.0, 2.0])
    with torch.no_grad():
        torch.testing.assert_close(model(x_t, sigma, x0), plain(x_t, sigma, x0), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the mask

def described_pairs(x_t: torch.Tensor, clean: torch.Tensor, block: int) -> torch.Tensor:
    """The issue's rule written out pair by pair: noisy tokens see their own noisy block and the clean
    blocks before it, clean tokens see the clean blocks up to their own, all within a document (the BOS
    tokens visible to the query's side: clean ones before its block, its own block's visible ones)."""
    length = x_t.size(0)
    seq = torch.cat([x_t, clean]).tolist()

    def document(i: int) -> int:
        if i >= length:
            return sum(t == BOS_ID for t in seq[length: i + 1])
        start = i // block * block
        return sum(t == BOS_ID for t in seq[length: length + start]) + sum(t == BOS_ID for t in seq[start: i + 1])

    allowed = torch.zeros(2 * length, 2 * length, dtype=torch.bool)
    for q in range(2 * length):
        for k in range(2 * length):
            q_block, k_block = (q % length) // block, (k % length) // block
            if q < length:
                ok = (k < length and k_block == q_block) or (k >= length and k_block < q_block)
            else:
                ok = k >= length and k_block <= q_block
            allowed[q, k] = ok and document(q) == document(k)
    return allowed


@pytest.mark.parametrize("block", [1, 2, 4, 12])
def test_block_mask_allows_exactly_the_described_pairs(block):
    clean = torch.tensor([BOS_ID, 5, 6, 7, BOS_ID, 8, 9, 10, 11, BOS_ID, 12, 13])
    x_t = clean.clone()
    x_t[[1, 4, 7, 10]] = 1024  # MASK, the second BOS among them: its block merges two documents
    docs = block_document_ids(x_t[None], clean[None], "packed", 1025, block)
    mask = block_attention_mask(docs, 12, block, use_flex=False)
    assert torch.equal(mask[0, 0], described_pairs(x_t, clean, block))


def test_a_block_never_sees_later_clean_tokens():
    model = random_model(8)
    x0 = docs_rows(2, 32, seed=5)
    x_t = torch.full_like(x0, model.cfg.tokens.mask)
    changed = x0.clone()
    changed[:, 16:] = torch.randint(4, 1000, (2, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        a = model(x_t, torch.ones(2), clean=x0)
        b = model(x_t, torch.ones(2), clean=changed)
    assert torch.equal(a[:, :24], b[:, :24])  # blocks 0-2 see only clean blocks before them: unchanged
    assert not torch.equal(a[:, 24:], b[:, 24:])  # block 3 sees clean block 2, which changed


# ---------------------------------------------------------------- B = 1 is the chain rule

def test_block_one_planned_code_length_is_the_chain_rule():
    model = random_model(1, layout="stream")
    val = docs_rows(1, 64, seed=7).flatten().numpy()
    slices = make_slices(val, 32, 2, EveryByte(), model.cfg.tokens.pad)
    bits = planned_bits(model, slices, "strict", "left-to-right", tokens_per_pass=1, eps=model.cfg.noise_eps,
                        vocab_size=model.cfg.vocab_size, batch_rows=8, device=torch.device("cpu"), block=1)
    expected = np.zeros(2)
    fully_masked = torch.tensor([-math.log(model.cfg.noise_eps)])  # sigma(t = 1), as a planned pass sets it
    with torch.no_grad():  # -log2 p(x_i | x_<i), one token at a time through the KV cache
        for row, x0 in enumerate(torch.from_numpy(slices.tokens)):
            cache = model.new_cache()
            for i, token in enumerate(x0.tolist()):
                masked = torch.tensor([[model.cfg.tokens.mask]])
                logits = model.forward_cached(masked, fully_masked, cache)
                expected[row] -= subs_log_probs(logits, model.cfg.tokens, torch.float64)[0, 0, token].item() / math.log(2)
                model.forward_cached(torch.tensor([[token]]), torch.zeros(1), cache, store=True)
    np.testing.assert_allclose(bits, expected, rtol=1e-5)


def test_planned_blocks_decode_exactly_the_scored_tokens():
    model = random_model(8)
    val = docs_rows(1, 96, seed=8).flatten().numpy()
    slices = make_slices(val, 32, 3, EveryByte(), model.cfg.tokens.pad)
    kwargs = dict(eps=model.cfg.noise_eps, vocab_size=model.cfg.vocab_size, batch_rows=2,
                  device=torch.device("cpu"), block=8)
    for order in ("left-to-right", "confidence"):
        bits = planned_bits(model, slices, "anchored", order, passes=3, **kwargs)
        assert np.isfinite(bits).all() and (bits > 0).all()


@pytest.mark.parametrize("order", ["left-to-right", "margin"])
def test_compress_with_a_block_model_round_trips(order):
    model = random_model(8)
    ids = docs_rows(1, 80, seed=9).flatten().numpy()  # 3 slices of 32, the last one PAD-filled
    data = compress_tokens(model, model.cfg, ids, order=order, passes=4, mode="anchored")
    assert np.array_equal(decompress_tokens(model, model.cfg, data), ids)
    other = with_block(model, 16)  # the same weights decoded in other blocks is another code
    with pytest.raises(ValueError, match="different model"):
        decompress_tokens(other, other.cfg, data)


# ---------------------------------------------------------------- sampling

@pytest.mark.parametrize("sampler", SAMPLERS)
def test_cached_block_sampling_equals_uncached(sampler):
    model = random_model(8, time_cond=True)
    runs = [generate(model, model.cfg, num=3, length=30, steps=4, sampler=sampler, seed=11, kv_cache=cached)
            for cached in (True, False)]
    assert runs[0].rows == runs[1].rows
    assert all(len(row) > 8 for row in runs[0].rows)  # several blocks were sampled


def test_block_sampling_runs_past_the_training_length():
    model = random_model(8)
    result = generate(model, model.cfg, num=2, length=50, steps=2, seed=1)  # seq_len is 32
    assert result.canvas.shape == (2, 50)
    assert not (result.canvas == model.cfg.tokens.mask).any()
