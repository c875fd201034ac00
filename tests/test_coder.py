"""The MDZ1 compressor: arithmetic coding, round trips, size = planned-order code length, checks."""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from torch import nn

from mdlm_golf.coder import (TOTAL, ArithmeticDecoder, ArithmeticEncoder, CoderError, Header,
                             compress_file, compress_tokens, cumulative_frequencies, decompress_file,
                             decompress_tokens, text_tokens)
from mdlm_golf.config import BOS_ID, Tokens, build_config
from mdlm_golf.data import ByteTable
from mdlm_golf.eval import evaluate
from mdlm_golf.eval.harness import make_slices, scored_positions
from mdlm_golf.model import Transformer
from mdlm_golf.eval.planned import Schedule, masked_start, planned_bits, run_planned

CPU = torch.device("cpu")
LONG_TEXT = ((
    "The tokenizer splits text into pieces, and the model predicts masked pieces from the ones it can "
    "see. A planned decoding order reveals a few positions at a time; every revealed token is coded "
    "with the probability the model gave it, so the file is exactly as long as the code length the "
    "evaluation reports, plus a few bytes. Long documents are cut into slices of the model's sequence "
    "length, and each slice is decoded on its own, from fully masked to fully revealed. "
) * 3).strip()
TEXTS = {"empty": "", "one token": "a", "non-ascii": "Zoë naïve café — 東京", "long": LONG_TEXT}


@pytest.fixture(scope="module")
def cfg():
    return build_config("tiny", environ={})


def perturbed_model(cfg, seed: int) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg)
    for param in model.parameters():
        nn.init.normal_(param, std=0.1)
    nn.init.normal_(model.head.weight, std=0.1)  # context-dependent, not absurdly confident
    return model.eval()


@pytest.fixture(scope="module")
def model(cfg):
    return perturbed_model(cfg, 0)


# ---------------------------------------------------------------- the arithmetic coder

def test_arithmetic_coder_round_trips_and_costs_the_ideal_length():
    rng = np.random.default_rng(0)
    for trial in range(4):
        size = [2, 5, 1024, 1024][trial]
        freqs = rng.integers(1, 50, size=(300, size))
        if trial == 3:  # near-certain symbols next to freq-1 ones: the extremes of the quantizer
            freqs[:, 0] = TOTAL - size
        cum = np.cumsum(freqs, axis=1)
        symbols = np.array([rng.choice(size, p=f / f.sum()) for f in freqs])
        enc = ArithmeticEncoder()
        for row, s in zip(cum, symbols):
            enc.encode(int(row[s - 1]) if s else 0, int(row[s]), int(row[-1]))
        code = enc.finish()
        dec = ArithmeticDecoder(code)
        out = []
        for row in cum:
            s = int(np.searchsorted(row, dec.target(int(row[-1])), side="right"))
            dec.consume(int(row[s - 1]) if s else 0, int(row[s]), int(row[-1]))
            out.append(s)
        assert out == symbols.tolist()
        ideal = -np.log2(freqs[np.arange(300), symbols] / cum[:, -1]).sum()
        assert ideal - 1 <= 8 * len(code) <= ideal + 2 + 8 + 300 * 1e-3, (trial, ideal, 8 * len(code))


def test_frequencies_give_every_token_at_least_one_and_fit_the_total():
    logits = torch.randn(7, 1026) * 30
    logits[:, 1024:] = float("-inf")
    cum = cumulative_frequencies(logits, 1024)
    freq = np.diff(cum, axis=1, prepend=0)
    assert freq.min() >= 1 and cum[:, -1].max() <= TOTAL
    assert np.array_equal(cum, cumulative_frequencies(logits.clone(), 1024))


# ---------------------------------------------------------------- files

@pytest.mark.parametrize("name", sorted(TEXTS))
def test_text_files_round_trip(tmp_path, model, cfg, shared_sp, name):
    data = TEXTS[name].encode("utf-8")
    path = tmp_path / "x.mdz"
    info = compress_file(model, cfg, shared_sp, data, path, order="confidence", passes=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.mdz"]  # no temporary left behind
    assert info["file_bytes"] == path.stat().st_size
    if name in ("long", "one token"):  # in the vocabulary: all of it through the model
        ids = text_tokens(shared_sp, TEXTS[name])
        assert info["tokens"] == ids.size and info["escaped_bytes"] == 0
    if name == "long":
        assert info["tokens"] > 2 * cfg.seq_len  # several slices
    if name == "non-ascii":  # characters outside the vocabulary go through the escape channel
        assert info["escaped_bytes"] > 0
    assert decompress_file(model, cfg, shared_sp, path) == data
    header, _ = Header.decode(path.read_bytes())
    assert header.data_crc == zlib.crc32(data)
    if name == "empty":  # BOS alone, and it is an anchor: nothing to code
        assert info["code_bytes"] == 0 and header.anchors == [0]


@pytest.mark.parametrize("order, schedule", [("left-to-right", dict(tokens_per_pass=1)),
                                             ("confidence", dict(passes=4)),
                                             ("margin", dict(tokens_per_pass=5))])
@pytest.mark.parametrize("mode", ["anchored", "strict"])
def test_code_size_is_the_planned_order_code_length(model, cfg, shared_sp, order, schedule, mode):
    """Several documents in one stream (BOS inside slices), coded and decoded; the code (after the
    header) is within a few bits per slice of planned_bits for the same tokens, order and schedule."""
    ids = np.concatenate([text_tokens(shared_sp, t) for t in (LONG_TEXT[:400], "a", LONG_TEXT[200:500])])
    data = compress_tokens(model, cfg, ids, order=order, mode=mode, batch_rows=3, **schedule)
    assert np.array_equal(decompress_tokens(model, cfg, data), ids)
    header, code = Header.decode(data)
    assert header.anchors == (np.flatnonzero(ids == BOS_ID).tolist() if mode == "anchored" else [])
    table = ByteTable.from_tokenizer(shared_sp, cfg.vocab_size)
    slices = make_slices(ids, cfg.seq_len, 0, table, cfg.tokens.pad)
    bits = planned_bits(model, slices, mode, order, eps=cfg.noise_eps, vocab_size=cfg.vocab_size,
                        batch_rows=3, device=CPU, **schedule).sum()
    coded = int(scored_positions(torch.from_numpy(slices.tokens), mode, cfg.tokens.pad).sum())
    code_bits = 8 * len(code)
    quantized = quantized_bits(model, cfg, slices, mode, order, schedule)
    # quantization costs <= ~V / TOTAL / ln 2 per token (the +1 floor can only make a token cheaper);
    # the coder's end at most 2 bits + a byte; no code beats its own quantized model by more than the
    # byte of zeros the decoder reads past a code whose trailing zero bytes were dropped
    assert quantized <= bits + coded * 2e-3, (quantized, bits)
    assert quantized - 8 <= code_bits <= quantized + 16 + 32 * len(slices), (code_bits, quantized)


def quantized_bits(model, cfg, slices, mode: str, order: str, schedule: dict) -> float:
    """The ideal code length under the coder's integer frequencies, -log2(freq / sum), same plan."""
    tokens, total = Tokens(cfg.vocab_size), 0.0
    x0 = torch.from_numpy(slices.tokens)
    scored = scored_positions(x0, mode, cfg.tokens.pad)
    for start in range(0, x0.size(0), 3):
        rows_x0, rows_scored = x0[start:start + 3], scored[start:start + 3]

        def reveal(rows, logits, chosen, cols):
            nonlocal total
            r, pos = chosen.nonzero(as_tuple=True)
            cum = cumulative_frequencies(logits[r, pos], cfg.vocab_size)
            ids = rows_x0[rows][:, cols][r, pos].numpy()
            freq = np.diff(np.concatenate([np.zeros((len(ids), 1), np.int64), cum], 1), axis=1)
            total -= np.log2(freq[np.arange(len(ids)), ids] / cum[:, -1]).sum()
            return rows_x0[rows][:, cols]

        with torch.no_grad():
            run_planned(model, masked_start(rows_x0, rows_scored, tokens), rows_scored, Schedule(**schedule),
                        order, cfg.noise_eps, tokens, reveal)
    return total


def test_any_token_stream_round_trips_including_vocabulary_edges(model, cfg):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, cfg.vocab_size, size=150)
    ids[[0, 37, 64, 65]] = BOS_ID
    ids[[5, 70]] = [0, cfg.vocab_size - 1]
    for mode in ("anchored", "strict"):
        data = compress_tokens(model, cfg, ids, order="margin", passes=16, mode=mode)
        assert np.array_equal(decompress_tokens(model, cfg, data), ids)
    assert np.array_equal(decompress_tokens(model, cfg, compress_tokens(model, cfg, [])), np.zeros(0))
    with pytest.raises(ValueError, match="token ids"):
        compress_tokens(model, cfg, [cfg.vocab_size])


def test_coding_restores_threads_and_training_mode(cfg):
    model = perturbed_model(cfg, 5).train()
    threads = torch.get_num_threads()
    compress_tokens(model, cfg, np.arange(1, 40), passes=4)
    assert model.training and torch.get_num_threads() == threads


# ---------------------------------------------------------------- damage is detected

@pytest.fixture(scope="module")
def long_file(tmp_path_factory, model, cfg, shared_sp):
    path = tmp_path_factory.mktemp("coder") / "long.mdz"
    compress_file(model, cfg, shared_sp, LONG_TEXT.encode("utf-8"), path, order="confidence", passes=8)
    return path


def test_corrupted_code_is_detected(tmp_path, model, cfg, shared_sp, long_file):
    data = bytearray(long_file.read_bytes())
    header_bytes = len(Header.decode(bytes(data))[0].encode())
    for offset in (header_bytes + 3, (header_bytes + len(data)) // 2, len(data) - 2):
        bad = data.copy()
        bad[offset] ^= 0x80  # (the last byte's low bits may lie past the coder's end: harmless)
        path = tmp_path / "bad.mdz"
        path.write_bytes(bytes(bad))
        with pytest.raises(CoderError, match="bad.mdz: decoded tokens fail their CRC"):
            decompress_file(model, cfg, shared_sp, path)
    path.write_bytes(bytes(data[: (header_bytes + len(data)) // 2]))  # truncated code
    with pytest.raises(CoderError, match="CRC"):
        decompress_file(model, cfg, shared_sp, path)


def test_corrupted_header_truncation_and_wrong_magic_are_detected(tmp_path, model, cfg, shared_sp, long_file):
    data = long_file.read_bytes()
    path = tmp_path / "bad.mdz"
    for bad, message in [(data[:7] + bytes([data[7] ^ 1]) + data[8:], "corrupted header"),
                         (data[:10], "truncated header"),
                         (b"PK\x03\x04" + data[4:], "not an MDZ1 file"),
                         (data[:4] + b"\x09" + data[5:], "unsupported MDZ1 version")]:
        path.write_bytes(bad)
        with pytest.raises(CoderError, match=message) as info:
            decompress_file(model, cfg, shared_sp, path)
        assert "\n" not in str(info.value) and str(path) in str(info.value)
    with pytest.raises(CoderError, match="cannot read"):
        decompress_file(model, cfg, shared_sp, tmp_path / "missing.mdz")


def test_a_different_model_is_detected(cfg, shared_sp, long_file):
    other = perturbed_model(cfg, 1)
    with pytest.raises(CoderError, match="long.mdz: made with a different model"):
        decompress_file(other, cfg, shared_sp, long_file)


class OtherTokenizer:
    """The shared tokenizer under another serialized model: what a different tokenizer file looks like."""

    def __init__(self, sp):
        self.sp = sp

    def __getattr__(self, name):
        return getattr(self.sp, name)

    def serialized_model_proto(self) -> bytes:
        return self.sp.serialized_model_proto() + b"x"


def test_a_different_tokenizer_is_detected(model, cfg, shared_sp, long_file):
    with pytest.raises(CoderError, match="long.mdz: made with a different model or tokenizer"):
        decompress_file(model, cfg, OtherTokenizer(shared_sp), long_file)


def test_a_changed_data_crc_is_detected(tmp_path, model, cfg, shared_sp):
    """Header fields are covered by the header CRC; a consistent header with a wrong bytes CRC
    (what a tokenizer that decodes differently would produce) fails the final check."""
    ids = text_tokens(shared_sp, "hello world")
    good = compress_tokens(model, cfg, ids, passes=2, data_crc=zlib.crc32(b"hello world"), sp=shared_sp)
    bad = compress_tokens(model, cfg, ids, passes=2, data_crc=zlib.crc32(b"hello there"), sp=shared_sp)
    path = tmp_path / "t.mdz"
    path.write_bytes(good)
    assert decompress_file(model, cfg, shared_sp, path) == b"hello world"
    path.write_bytes(bad)
    with pytest.raises(CoderError, match="t.mdz: decompressed bytes fail their CRC"):
        decompress_file(model, cfg, shared_sp, path)


# ---------------------------------------------------------------- the command line, once integrated

def test_cli_compress_and_decompress(tmp_path, cfg, shared_sp, shared_tokenizer_path):
    from mdlm_golf import cli
    from mdlm_golf.checkpoint import run_checkpoint, save_checkpoint

    if "decompress" not in cli.build_parser().format_help():
        pytest.skip("cli.py has no compress/decompress commands yet")
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run_checkpoint(run), perturbed_model(cfg, 2), cfg, tokenizer=str(shared_tokenizer_path))
    src, packed, out = tmp_path / "in.txt", tmp_path / "in.mdz", tmp_path / "out.txt"
    src.write_text(LONG_TEXT, encoding="utf-8")
    assert cli.main(["compress", "--run", str(run), str(src), str(packed), "--passes", "8"]) == 0
    assert cli.main(["decompress", "--run", str(run), str(packed), str(out)]) == 0
    assert out.read_text(encoding="utf-8") == LONG_TEXT
    packed.write_bytes(packed.read_bytes()[:-3] + b"\x01\x02\x03")
    assert cli.main(["decompress", "--run", str(run), str(packed), str(out)]) == 2


# ---------------------------------------------------------------- an autoregressive model

def test_an_ar_model_codes_left_to_right_at_its_chain_rule_figure():
    """An AR model compresses in the evaluator's windows through a KV cache: the file round-trips, and
    its code (strict: every id, id 0 with the uniform law) is the `eval` chain-rule figure plus id 0's
    log2 V, to within the coder's end bits and its 1/2**20 frequency rounding."""
    from conftest import synthetic_byte_table

    cfg = build_config("tiny", environ={}, overrides={"objective": "ar"})
    model = perturbed_model(cfg, 3)
    rng = np.random.default_rng(4)
    ids = rng.integers(4, cfg.vocab_size, size=3 * cfg.seq_len + 1)
    ids[[0, 50, 130]] = BOS_ID  # documents inside windows: attention must stop at them both ways
    blob = compress_tokens(model, cfg, ids, order="left-to-right", tokens_per_pass=1, mode="strict")
    assert np.array_equal(decompress_tokens(model, cfg, blob), ids)
    header_bits = 8 * len(Header.decode(blob)[0].encode())
    chain_rule = evaluate(model, ids, synthetic_byte_table(), cfg, num_seqs=0)["ar"]
    assert chain_rule["tokens"] == ids.size - 1
    code_bits = 8 * len(blob) - header_bits - np.log2(cfg.vocab_size)
    assert abs(code_bits - chain_rule["bits"]) <= 16 + 0.002 * ids.size, (code_bits, chain_rule["bits"])
    with pytest.raises(ValueError, match="left to right, one token per pass"):
        compress_tokens(model, cfg, ids, order="confidence", passes=4)
