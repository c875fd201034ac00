"""Encoder-decoder block diffusion (--decoder-layers K with --block-size B): the encoder reads the clean
blocks, a K-layer decoder denoises each noisy block from itself and the encoder's features before it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_blocks import EveryByte, described_pairs, docs_rows

from mdlm_golf.attention import block_document_ids, encoder_decoder_masks
from mdlm_golf.coder import compress_tokens, decompress_tokens
from mdlm_golf.config import BOS_ID, build_config
from mdlm_golf.eval import evaluate, headline
from mdlm_golf.model import Transformer
from mdlm_golf.sampling import SAMPLERS, generate

KINDS = {"own": dict(decoder_layers=1), "two-own": dict(decoder_layers=2), "tied": dict(decoder_layers=1,
                                                                                       decoder_tied=True)}


def encdec_model(kind: str = "own", block: int = 8, seed: int = 0, **overrides) -> Transformer:
    """A tiny encoder-decoder with weights large enough that every position depends on its context."""
    cfg = build_config("tiny", environ={}, overrides=dict(seq_len=32, block_size=block, **KINDS[kind], **overrides))
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model.eval()


def test_decoder_weights_own_or_tied_and_validated():
    plain = Transformer(build_config("tiny", environ={}, overrides=dict(seq_len=32, block_size=8)))
    own, tied = encdec_model("own"), encdec_model("tied")
    per_layer = sum(p.numel() for p in plain.blocks[0].parameters())
    assert own.num_params() == plain.num_params() + per_layer  # one decoder layer of its own
    assert tied.num_params() == plain.num_params()  # the top encoder layer, read twice
    assert tied.decoder_blocks == [tied.blocks[-1]]
    for bad, message in [(dict(decoder_layers=1), "needs block diffusion"),
                         (dict(decoder_layers=3, block_size=8, decoder_tied=True), "at most num_layers")]:
        with pytest.raises(ValueError, match=message):
            build_config("tiny", environ={}, overrides=dict(seq_len=32, **bad))


@pytest.mark.parametrize("block", [1, 2, 4, 12])
def test_masks_are_the_rows_of_the_described_rule(block):
    """The encoder's mask is the clean rows x clean keys of the [x_t ; x_0] rule and the decoder's the
    noisy rows x all keys: no position sees a later clean block or another document."""
    clean = torch.tensor([BOS_ID, 5, 6, 7, BOS_ID, 8, 9, 10, 11, BOS_ID, 12, 13])
    x_t = clean.clone()
    x_t[[1, 4, 7, 10]] = 1024  # MASK, a BOS among them
    docs = block_document_ids(x_t[None], clean[None], "packed", 1025, block)
    encoder, decoder = encoder_decoder_masks(docs, 12, block, use_flex=False)
    allowed = described_pairs(x_t, clean, block)
    assert torch.equal(encoder[0, 0], allowed[12:, 12:])
    assert torch.equal(decoder[0, 0], allowed[:12, :])


@pytest.mark.parametrize("kind", list(KINDS))
def test_no_block_sees_later_clean_blocks_or_other_documents(kind):
    model = encdec_model(kind)
    x0 = docs_rows(2, 32, seed=5)  # documents start at 0 and 10
    x_t = torch.full_like(x0, model.cfg.tokens.mask)
    x_t[:, [0, 10]] = BOS_ID
    later = x0.clone()
    later[:, 16:] = torch.randint(4, 1000, (2, 16), generator=torch.Generator().manual_seed(6))
    other_doc = x0.clone()
    other_doc[:, 2:8] = torch.randint(4, 1000, (2, 6), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        a = model(x_t, torch.ones(2), x0)
        assert torch.equal(a[:, :24], model(x_t, torch.ones(2), later)[:, :24])  # blocks 0-2: unchanged
        assert not torch.equal(a[:, 24:], model(x_t, torch.ones(2), later)[:, 24:])  # block 3 reads block 2
        b = model(x_t, torch.ones(2), other_doc)
    torch.testing.assert_close(a[:, 16:], b[:, 16:], rtol=0, atol=1e-6)  # the second document never saw it
    assert not torch.equal(a[:, 8:10], b[:, 8:10])  # the first document's later block did


@pytest.mark.parametrize("kind", list(KINDS))
def test_cached_decoding_equals_the_full_forward(kind):
    """Each block's logits from the KV cache (the encoder run once per clean block, each decoder layer's
    keys and values of its features kept) equal the training forward's, for every block."""
    model = encdec_model(kind)
    x0 = docs_rows(3, 32, seed=8)
    x_t = torch.where(torch.rand(x0.shape, generator=torch.Generator().manual_seed(9)) < 0.6,
                      model.cfg.tokens.mask, x0)
    sigma = torch.tensor([0.2, 1.0, 3.0])
    cache = model.new_cache()
    with torch.no_grad():
        full = model(x_t, sigma, x0)
        for lo in range(0, 32, 8):
            cached = model.forward_cached(x_t[:, lo:lo + 8], sigma, cache)
            torch.testing.assert_close(cached, full[:, lo:lo + 8], rtol=1e-5, atol=1e-5)
            model.extend_cache(cache, x0[:, lo:lo + 8])
    assert cache.length == 32


def test_evaluation_runs_the_encoder_once_per_clean_row():
    """The ELBO's rows repeat each slice once per step; outside training the encoder runs on the distinct
    rows only, with the same logits as running it on every row."""
    model = encdec_model("own")
    x0 = docs_rows(2, 32, seed=10).repeat(3, 1)
    x_t = torch.where(torch.rand(x0.shape, generator=torch.Generator().manual_seed(11)) < 0.5,
                      model.cfg.tokens.mask, x0)
    sigma = torch.linspace(0.1, 3.0, 6)
    with torch.no_grad():
        deduped = model.eval()(x_t, sigma, x0)
        every_row = model.train()(x_t, sigma, x0)
    torch.testing.assert_close(deduped, every_row, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["own", "tied"])
def test_compress_round_trips(kind):
    model = encdec_model(kind)
    ids = docs_rows(1, 80, seed=12).flatten().numpy()
    for order in ("left-to-right", "confidence"):
        data = compress_tokens(model, model.cfg, ids, order=order, passes=4, mode="anchored")
        assert np.array_equal(decompress_tokens(model, model.cfg, data), ids)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_cached_sampling_equals_uncached(sampler):
    model = encdec_model("own", time_cond=True)
    runs = [generate(model, model.cfg, num=3, length=30, steps=4, sampler=sampler, seed=13, kv_cache=cached)
            for cached in (True, False)]
    assert runs[0].rows == runs[1].rows


def test_small_blocks_report_the_exact_code_length_and_headline_the_smaller():
    """In blocks of <= 4 evaluate() adds the left-to-right planned code length (exact) beside the ELBO
    (an upper bound); the headline is the smaller of the two strict figures, labelled with its kind."""
    model = encdec_model("own", block=2)
    val = docs_rows(1, 32 * 3, seed=14).flatten().numpy()
    results = evaluate(model, val, EveryByte(), model.cfg, steps=4, num_seqs=3, seed=0)
    assert set(results) == {"strict", "anchored", "strict exact", "anchored exact"}
    exact = results["strict exact"]
    assert exact["method"] == "planned" and exact["order"] == "left-to-right" and exact["tokens_per_pass"] == 1
    assert exact["network_evals"] == 3 * 32  # one decoder pass per token
    best = headline(results)
    assert best["bpb"] == min(results["strict"]["bpb"], exact["bpb"])
    wider = encdec_model("own", block=8)
    assert set(evaluate(wider, val, EveryByte(), wider.cfg, steps=4, num_seqs=3, seed=0)) == {"strict", "anchored"}
