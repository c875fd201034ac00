"""Compress and decompress token streams and files: arithmetic coding driven by the model.

A masked-diffusion model's encoder runs planned.run_planned, the loop planned_bits measures, and codes
each chosen token with the model's quantized marginal at its position; the decoder runs the same loop on
the same revealed state, so it makes the same choices and rebuilds the same frequencies. An
autoregressive model codes left to right in the evaluator's windows, one token per forward through a
KV cache, so its code length is its `eval` chain-rule figure. What coding needs to be bit-identical:
CPU, float32, one torch thread while coding, the same batch of slices per forward (the batch size is in
the header). A file made on another CPU or torch build may still decode differently; the token CRC then
catches it.
"""
from __future__ import annotations

import math
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..config import BOS_ID, Config, Tokens
from ..diffusion import subs_logits
from ..eval import Schedule, check_order, masked_start, run_planned
from ..eval.planned import Reveal
from ..files import write_bytes_atomic
from .arithmetic import ArithmeticDecoder, ArithmeticEncoder, cumulative_frequencies, min_bits_per_symbol
from .container import CoderError, Header, ids_crc, model_fingerprint
from .escape import apply_edits, pack_edits, split_input, unpack_edits

CODER_MODES = ("strict", "anchored")
# The encoder drops the code's trailing zero bytes (the decoder reads zeros past the end); a token costs at
# least min_bits_per_symbol, so a header's token count is bounded by the code's bits plus this many dropped
# bytes (32,768 zero bits: ~23M near-certain tokens at a file's end, far past any real file)
DROPPED_ZERO_SLACK = 4096
BATCH_ROWS = 16  # slices per forward (recorded in the header: the decoder must batch the same way)

# the left-to-right loop's callback: reveal(position, logits [V]) -> the id at that stream position
RevealOne = Callable[[int, torch.Tensor], int]


@contextmanager
def coding_context(model) -> Iterator[None]:
    """One torch thread, no grad, eval mode: the forward must be bit-identical in encoder and decoder."""
    param = next(model.parameters(), None)
    if param is not None and (param.device.type != "cpu" or param.dtype != torch.float32):
        raise ValueError("the coder needs the model on the CPU in float32 (load it with device='cpu')")
    threads, was_training = torch.get_num_threads(), model.training
    torch.set_num_threads(1)
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        torch.set_num_threads(threads)
        model.train(was_training)


def slice_rows(num_tokens: int, seq_len: int, tokens: Tokens, anchors: list[int],
               ids: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0 [S, L], scored [S, L]): the stream cut into seq_len slices, PAD after its end; without ids
    the coded positions hold MASK (what the decoder starts from). Anchors are BOS and not scored."""
    rows = -(-num_tokens // seq_len)
    flat = torch.full((rows * seq_len,), tokens.pad, dtype=torch.long)
    flat[:num_tokens] = tokens.mask if ids is None else torch.from_numpy(ids)
    scored = flat != tokens.pad
    if anchors:
        index = torch.tensor(anchors, dtype=torch.long)
        flat[index], scored[index] = BOS_ID, False
    return flat.view(rows, seq_len), scored.view(rows, seq_len)


def code_slices(model, header: Header, eps: float, tokens: Tokens,
                reveal_for: Callable[[slice], Reveal], block: int = 0) -> torch.Tensor:
    """Run the planned loop over the slices in header.batch_rows batches; reveal_for(batch), batch a
    slice of rows, makes that batch's reveal callback. Returns the decoded x [S, L]. block: a block
    diffusion model's block size (decoded block by block), 0 for the plain MDLM."""
    x, scored = slice_rows(header.num_tokens, header.seq_len, tokens, header.anchors)
    for start in range(0, x.size(0), header.batch_rows):
        batch = slice(start, start + header.batch_rows)
        x_b = masked_start(x[batch], scored[batch], tokens)
        run_planned(model, x_b, scored[batch], header.schedule, header.order, eps, tokens,
                    reveal_for(batch), block)
        x[batch] = x_b
    return x


def code_left_to_right(model, header: Header, tokens: Tokens, reveal: RevealOne) -> torch.Tensor:
    """An autoregressive model's loop over the stream [N]: the challenge evaluator's windows (window w
    predicts ids wL+1 .. wL+L from the ids before them in the window, from id wL on), one id per forward
    through a KV cache; id 0 has no context and takes the uniform law. Anchors are given, not coded."""
    n, length, anchors = header.num_tokens, header.seq_len, set(header.anchors)
    x = torch.full((1, n), tokens.mask, dtype=torch.long)
    if n:
        x[0, 0] = BOS_ID if 0 in anchors else reveal(0, torch.zeros(tokens.vocab_size))
    for start in range(0, n - 1, length):
        cache = model.new_cache()
        for i in range(start + 1, min(start + length, n - 1) + 1):
            logits = model.forward_cached(x[:, i - 1:i], None, cache, store=True)[0, -1]
            x[0, i] = BOS_ID if i in anchors else reveal(i, subs_logits(logits, tokens))
    return x[0]


def encode_chosen(encoder: ArithmeticEncoder, truth: torch.Tensor, logits: torch.Tensor,
                  chosen: torch.Tensor, vocab_size: int) -> None:
    """Code truth[chosen] with the quantized marginals logits[chosen], in row-major order."""
    cum = cumulative_frequencies(logits[chosen], vocab_size)
    symbols = truth[chosen].numpy()
    index = np.arange(symbols.size)
    hi = cum[index, symbols]
    lo = np.where(symbols > 0, cum[index, np.maximum(symbols - 1, 0)], 0)
    for a, b, total in zip(lo.tolist(), hi.tolist(), cum[:, -1].tolist()):
        encoder.encode(a, b, total)


def decode_chosen(decoder: ArithmeticDecoder, logits: torch.Tensor, chosen: torch.Tensor,
                  tokens: Tokens) -> torch.Tensor:
    """The ids at `chosen` read back from the code (MASK elsewhere), in encode_chosen's order."""
    cum = cumulative_frequencies(logits[chosen], tokens.vocab_size)
    symbols = []
    for row in cum:
        total = int(row[-1])
        s = min(int(np.searchsorted(row, decoder.target(total), side="right")), tokens.vocab_size - 1)
        decoder.consume(int(row[s - 1]) if s else 0, int(row[s]), total)
        symbols.append(s)
    values = torch.full(chosen.shape, tokens.mask, dtype=torch.long)
    values[chosen] = torch.tensor(symbols, dtype=torch.long)
    return values


def checked_ids(cfg: Config, token_ids, order: str, schedule: Schedule, mode: str, escape: bytes,
                data_crc: int | None) -> np.ndarray:
    """token_ids as int64, after the checks compress_tokens makes before it codes anything."""
    if escape and data_crc is None:
        raise ValueError("an escape section needs data_crc (it belongs to a file)")
    check_order(order)
    cfg.require_token_level("compress")
    if cfg.autoregressive and (order != "left-to-right" or schedule.tokens_per_pass != 1):
        raise ValueError("an autoregressive model codes left to right, one token per pass "
                         f"(got order {order!r}, {schedule.describe()})")
    if mode not in CODER_MODES:
        raise ValueError(f"mode must be one of {CODER_MODES}, got {mode!r}")
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
        raise ValueError(f"token ids must lie in [0, {cfg.vocab_size})")
    return ids


def compress_tokens(model, cfg: Config, token_ids, *, order: str = "confidence",
                    tokens_per_pass: int | None = None, passes: int | None = None,
                    mode: str = "anchored", batch_rows: int = BATCH_ROWS, data_crc: int | None = None,
                    escape: bytes = b"", sp=None) -> bytes:
    """An MDZ1 byte string coding token_ids (one ids CRC inside): slice by slice in planned order for a
    masked-diffusion model, left to right for an AR model (order left-to-right, one token per pass).

    data_crc, escape and sp are for files: the original bytes' CRC32, the escape section, and the
    tokenizer to fingerprint with the model.
    """
    if tokens_per_pass is None and passes is None:
        tokens_per_pass = 1
    schedule = Schedule(tokens_per_pass, passes)
    ids = checked_ids(cfg, token_ids, order, schedule, mode, escape, data_crc)
    tokens = cfg.tokens
    anchors = np.flatnonzero(ids == BOS_ID).tolist() if mode == "anchored" else []
    header = Header(mode, order, cfg.seq_len, schedule, batch_rows, int(ids.size), anchors, ids_crc(ids),
                    data_crc, model_fingerprint(model, cfg, sp), len(escape))
    encoder = ArithmeticEncoder()
    with coding_context(model):
        if cfg.autoregressive:
            truth = torch.from_numpy(ids)

            def encode_one(position: int, logits: torch.Tensor) -> int:
                encode_chosen(encoder, truth[None, position:position + 1], logits[None, None],
                              torch.ones(1, 1, dtype=torch.bool), cfg.vocab_size)
                return int(truth[position])

            code_left_to_right(model, header, tokens, encode_one)
        else:
            x0, _ = slice_rows(ids.size, cfg.seq_len, tokens, anchors, ids)

            def reveal_for(batch: slice) -> Reveal:
                def encode(rows, logits, chosen, cols):
                    truth = x0[batch][rows][:, cols]
                    encode_chosen(encoder, truth, logits, chosen, cfg.vocab_size)
                    return truth
                return encode

            code_slices(model, header, cfg.noise_eps, tokens, reveal_for, cfg.block_size)
    return header.encode() + escape + encoder.finish()


def decode_stream(model, cfg: Config, data: bytes, sp=None) -> tuple[Header, np.ndarray, bytes]:
    """The header, the decoded token ids (checked against the model fingerprint and the ids CRC) and
    the escape section (empty for a bare token stream)."""
    cfg.require_token_level("decompress")
    header, body = Header.decode(data)
    if len(body) < header.escape_len:
        raise CoderError("truncated escape section")
    escape, code = body[:header.escape_len], body[header.escape_len:]
    fingerprint = model_fingerprint(model, cfg, sp)
    if header.fingerprint != fingerprint:
        raise CoderError(f"made with a different model{' or tokenizer' if sp is not None else ''} "
                         f"(fingerprint {header.fingerprint.hex()}, this one {fingerprint.hex()})")
    if header.seq_len != cfg.seq_len:  # the encoder slices by the model's own length; checked before any slicing
        raise CoderError(f"corrupted header: slices of {header.seq_len:,} tokens, but this model codes slices "
                         f"of {cfg.seq_len:,}")
    anchors = header.anchors
    if anchors and (anchors[-1] >= header.num_tokens or len(set(anchors)) < len(anchors)):
        raise CoderError("corrupted header (anchor positions)")
    most = len(anchors) + int(8 * (len(code) + DROPPED_ZERO_SLACK) / min_bits_per_symbol(cfg.vocab_size)) + 1
    if header.num_tokens > most:  # checked before anything is allocated for them
        raise CoderError(f"corrupted header: it claims {header.num_tokens:,} tokens, more than a "
                         f"{len(code):,}-byte code can hold ({most:,})")
    tokens = cfg.tokens
    decoder = ArithmeticDecoder(code)
    with coding_context(model):
        if cfg.autoregressive:
            def decode_one(position: int, logits: torch.Tensor) -> int:
                return int(decode_chosen(decoder, logits[None, None], torch.ones(1, 1, dtype=torch.bool), tokens))

            ids = code_left_to_right(model, header, tokens, decode_one).numpy()
        else:
            def reveal_for(batch: slice) -> Reveal:
                return lambda rows, logits, chosen, cols: decode_chosen(decoder, logits, chosen, tokens)

            x = code_slices(model, header, cfg.noise_eps, tokens, reveal_for, cfg.block_size)
            ids = x.reshape(-1)[: header.num_tokens].numpy()
    if ids_crc(ids) != header.ids_crc:
        raise CoderError("decoded tokens fail their CRC (corrupted data, or a different torch/CPU)")
    return header, ids, escape


def decompress_tokens(model, cfg: Config, payload: bytes) -> np.ndarray:
    """The token ids compress_tokens coded into `payload` (int64)."""
    return decode_stream(model, cfg, payload)[1]


def text_tokens(sp, text: str) -> np.ndarray:
    """The text as one document: [BOS] + its ids."""
    return np.asarray([BOS_ID, *sp.encode(text)], dtype=np.int64)


def compress_file(model, cfg: Config, sp, data: bytes, out_path: Path, *, order: str = "confidence",
                  tokens_per_pass: int | None = None, passes: int | None = None,
                  mode: str = "anchored", batch_rows: int = BATCH_ROWS) -> dict:
    """Write any bytes as an MDZ1 file, losslessly; returns its sizes (bits_per_byte counts every
    byte of the file per input byte; escaped_bytes: input bytes the escape channel holds)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"compress_file takes bytes, not {type(data).__name__} (encode text first)")
    data = bytes(data)
    model_text, edits = split_input(sp, data)
    ids = text_tokens(sp, model_text)
    escape = pack_edits(edits)
    blob = compress_tokens(model, cfg, ids, order=order, tokens_per_pass=tokens_per_pass, passes=passes,
                           mode=mode, batch_rows=batch_rows, data_crc=zlib.crc32(data), escape=escape, sp=sp)
    write_bytes_atomic(Path(out_path), blob)
    header_bytes = len(Header.decode(blob)[0].encode())
    return {"input_bytes": len(data), "file_bytes": len(blob),
            "bits_per_byte": 8 * len(blob) / len(data) if data else math.inf,
            "tokens": int(ids.size), "escaped_bytes": sum(len(e[2]) for e in edits),
            "header_bytes": header_bytes, "escape_section_bytes": len(escape),
            "code_bytes": len(blob) - header_bytes - len(escape)}


def decompress_file(model, cfg: Config, sp, path: Path) -> bytes:
    """The original bytes of an MDZ1 file; any mismatch is a one-line CoderError naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CoderError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header, ids, escape = decode_stream(model, cfg, data, sp)
        if header.data_crc is None or ids.size == 0 or ids[0] != BOS_ID:
            raise CoderError("not a compressed file (a bare token stream: use decompress_tokens)")
        out = apply_edits(sp.decode(ids[1:].tolist()).encode("utf-8"), unpack_edits(escape))
        if zlib.crc32(out) != header.data_crc:
            raise CoderError("decompressed bytes fail their CRC")
    except CoderError as e:
        raise CoderError(f"{path}: {e}") from None
    return out
