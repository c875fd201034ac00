"""A compressor that realizes the planned-order code length: arithmetic coding driven by the MDLM.

The encoder runs planned.run_planned, the loop planned_bits measures, and codes each chosen token
with the model's quantized marginal at its position; the decoder runs the same loop on the same
revealed state, so it makes the same choices and rebuilds the same frequencies. What it needs to be
bit-identical: CPU, float32, one torch thread while coding, the same batch of slices per forward
(the batch size is in the header). A file made on another CPU or torch build may still decode
differently; the token CRC then catches it.

Coder: Witten-Neal-Cleary arithmetic coding, 32-bit low/high, bit output with pending bits.
Frequencies: freq = floor(p * (TOTAL - V)) + 1 with TOTAL = 2**20, so every token has freq >= 1
and the total stays far below the coder's minimum range (2**30). Against the float code length the
quantization costs at most ~V / TOTAL / ln 2 = 0.0014 bits per token (and saves bits on tokens the
model gave p < 2**-20: the +1 is a floor); the coder's end costs ~2 bits plus the last byte.

File (all integers little-endian; "uv" = unsigned LEB128 varint):
  b"MDZ1" | version u8 | flags u8 (1: anchored, 2: a file: bytes CRC and escape section present) |
  order u8 | uv seq_len, tokens_per_pass (0 = by passes), passes (0 = by tokens per pass), batch_rows,
  num_tokens, num_anchors, anchor gaps... | CRC32 of the token ids (uint32 each) u32 |
  [CRC32 of the original bytes u32 | uv escape section length] | fingerprint of the model (+ tokenizer,
  for files) 8 bytes | CRC32 of the header so far u32 | [escape section] | code
Anchored mode gives the BOS positions (the anchors) in the header and codes every other token;
strict codes every token. Trailing zero bytes of the code are dropped (the decoder reads zeros), which
is why the code comes last.

Files (any bytes, lossless): the model codes [BOS] + the tokens of a "model text" that the tokenizer
rebuilds exactly (the input's in-vocabulary characters, whitespace gaps as one space); the escape
section holds the edits that turn the model text's UTF-8 bytes back into the input: per edit, bytes
to copy, bytes to drop, literal bytes to insert. It is empty when there are no edits, else a method
byte (0 stored, 1 raw deflate, 2 raw LZMA2: the smallest) and the compressed columns
uv count | copies... | drops... | literal lengths... | literals.
"""
from __future__ import annotations

import hashlib
import json
import lzma
import math
import re
import struct
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import BOS_ID, Config
from .diffusion import Tokens
from .files import write_bytes_atomic
from .eval import ORDERS, Schedule, check_order, masked_start, require_mdlm, run_planned

MAGIC = b"MDZ1"
VERSION = 2  # 2: files are lossless (bytes CRC, escape section)
STATE_BITS = 32
FULL = (1 << STATE_BITS) - 1
HALF = 1 << (STATE_BITS - 1)
QUARTER = 1 << (STATE_BITS - 2)
TOTAL = 1 << 20  # frequency scale; must stay well below QUARTER
CODER_MODES = ("strict", "anchored")
BATCH_ROWS = 16  # slices per forward (recorded in the header: the decoder must batch the same way)
FLAG_ANCHORED, FLAG_FILE = 1, 2
LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": 1 << 24}]


class CoderError(ValueError):
    """A compressed file that cannot be decoded faithfully; the message is one line."""


# ---------------------------------------------------------------- arithmetic coding

class ArithmeticEncoder:
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
    p = torch.softmax(logits.float(), dim=-1)[:, :vocab_size].double().cpu().numpy()
    freq = np.floor(p * (TOTAL - vocab_size)).astype(np.int64) + 1
    return np.cumsum(freq, axis=1)


# ---------------------------------------------------------------- header

def model_fingerprint(model, cfg: Config, sp=None) -> bytes:
    """First 8 bytes of sha256 over the float32 weights (names, shapes, values), vocab_size and
    noise_eps, and for text files the tokenizer (its serialized model), which turns ids into text."""
    h = hashlib.sha256(json.dumps({"vocab_size": cfg.vocab_size, "noise_eps": cfg.noise_eps}).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"{name}{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    if sp is not None:
        h.update(sp.serialized_model_proto())
    return h.digest()[:8]


def ids_crc(ids: np.ndarray) -> int:
    return zlib.crc32(np.asarray(ids, dtype="<u4").tobytes())


def put_varint(out: bytearray, value: int) -> None:
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return


class Reader:
    """Reads the fields of a header (or of `what`) from bytes; running off the end is a CoderError."""

    def __init__(self, data: bytes, what: str = "header") -> None:
        self.data, self.offset, self.what = data, 0, what

    def take(self, size: int) -> bytes:
        if self.offset + size > len(self.data):
            raise CoderError(f"truncated {self.what}")
        chunk = self.data[self.offset:self.offset + size]
        self.offset += size
        return chunk

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def varint(self) -> int:
        value = shift = 0
        while True:
            byte = self.take(1)[0]
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
            if shift > 63:
                raise CoderError(f"corrupted {self.what} (varint too long)")


@dataclass
class Header:
    mode: str
    order: str
    seq_len: int
    schedule: Schedule
    batch_rows: int
    num_tokens: int
    anchors: list[int]  # stream positions of the given BOS tokens (anchored mode)
    ids_crc: int
    data_crc: int | None  # files: CRC32 of the original bytes
    fingerprint: bytes
    escape_len: int = 0  # files: bytes of the escape section between the header and the code

    def encode(self) -> bytes:
        flags = ((FLAG_ANCHORED if self.mode == "anchored" else 0)
                 | (FLAG_FILE if self.data_crc is not None else 0))
        out = bytearray(MAGIC + bytes([VERSION, flags, ORDERS.index(self.order)]))
        for value in (self.seq_len, self.schedule.tokens_per_pass or 0, self.schedule.passes or 0,
                      self.batch_rows, self.num_tokens, len(self.anchors)):
            put_varint(out, value)
        for gap in np.diff(self.anchors, prepend=0).tolist():
            put_varint(out, gap)
        out += struct.pack("<I", self.ids_crc)
        if self.data_crc is not None:
            out += struct.pack("<I", self.data_crc)
            put_varint(out, self.escape_len)
        out += self.fingerprint
        return bytes(out + struct.pack("<I", zlib.crc32(out)))

    @classmethod
    def decode(cls, data: bytes) -> tuple["Header", bytes]:
        """The header and what follows it (escape section and code)."""
        r = Reader(data)
        if r.take(4) != MAGIC:
            raise CoderError("not an MDZ1 file (bad magic)")
        version, flags, order = r.take(3)
        if version != VERSION:
            raise CoderError(f"unsupported MDZ1 version {version} (expected {VERSION})")
        seq_len, per_pass, passes, batch_rows, num_tokens, num_anchors = (r.varint() for _ in range(6))
        if num_anchors > num_tokens:
            raise CoderError("corrupted header (more anchors than tokens)")
        anchors = np.cumsum([r.varint() for _ in range(num_anchors)]).tolist()
        crc = r.u32()
        data_crc, escape_len = (r.u32(), r.varint()) if flags & FLAG_FILE else (None, 0)
        fingerprint = r.take(8)
        if r.u32() != zlib.crc32(data[:r.offset - 4]):
            raise CoderError("corrupted header (CRC mismatch)")
        if order >= len(ORDERS) or seq_len < 1 or batch_rows < 1 or (per_pass == 0) == (passes == 0):
            raise CoderError("corrupted header (bad field)")
        schedule = Schedule(per_pass or None, passes or None)
        mode = "anchored" if flags & FLAG_ANCHORED else "strict"
        return cls(mode, ORDERS[order], seq_len, schedule, batch_rows, num_tokens, anchors, crc,
                   data_crc, fingerprint, escape_len), data[r.offset:]


# ---------------------------------------------------------------- coding the token stream

@contextmanager
def coding_context(model):
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


def code_slices(model, header: Header, eps: float, tokens: Tokens, reveal_for) -> torch.Tensor:
    """Run the planned loop over the slices in header.batch_rows batches; reveal_for(x0_batch) makes
    each batch's reveal callback. Returns the decoded x [S, L]."""
    x, scored = slice_rows(header.num_tokens, header.seq_len, tokens, header.anchors)
    for start in range(0, x.size(0), header.batch_rows):
        batch = slice(start, start + header.batch_rows)
        x_b = masked_start(x[batch], scored[batch], tokens)
        run_planned(model, x_b, scored[batch], header.schedule, header.order, eps, tokens,
                    reveal_for(batch))
        x[batch] = x_b
    return x


def compress_tokens(model, cfg: Config, token_ids, *, order: str = "confidence",
                    tokens_per_pass: int | None = None, passes: int | None = None,
                    mode: str = "anchored", batch_rows: int = BATCH_ROWS, data_crc: int | None = None,
                    escape: bytes = b"", sp=None) -> bytes:
    """An MDZ1 byte string coding token_ids slice by slice in planned order (one ids CRC inside).

    data_crc, escape and sp are for files: the original bytes' CRC32, the escape section, and the
    tokenizer to fingerprint with the model.
    """
    if escape and data_crc is None:
        raise ValueError("an escape section needs data_crc (it belongs to a file)")
    require_mdlm(cfg)
    check_order(order)
    if mode not in CODER_MODES:
        raise ValueError(f"mode must be one of {CODER_MODES}, got {mode!r}")
    if tokens_per_pass is None and passes is None:
        tokens_per_pass = 1
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
        raise ValueError(f"token ids must lie in [0, {cfg.vocab_size})")
    tokens = Tokens(cfg.vocab_size)
    anchors = np.flatnonzero(ids == BOS_ID).tolist() if mode == "anchored" else []
    header = Header(mode, order, cfg.seq_len, Schedule(tokens_per_pass, passes), batch_rows, int(ids.size),
                    anchors, ids_crc(ids), data_crc, model_fingerprint(model, cfg, sp), len(escape))
    x0, _ = slice_rows(ids.size, cfg.seq_len, tokens, anchors, ids)
    encoder = ArithmeticEncoder()

    def reveal_for(batch):
        def encode(rows, logits, chosen):
            truth = x0[batch][rows]
            cum = cumulative_frequencies(logits[chosen], cfg.vocab_size)
            symbols = truth[chosen].numpy()
            index = np.arange(symbols.size)
            hi = cum[index, symbols]
            lo = np.where(symbols > 0, cum[index, np.maximum(symbols - 1, 0)], 0)
            for a, b, total in zip(lo.tolist(), hi.tolist(), cum[:, -1].tolist()):
                encoder.encode(a, b, total)
            return truth
        return encode

    with coding_context(model):
        code_slices(model, header, cfg.noise_eps, tokens, reveal_for)
    return header.encode() + escape + encoder.finish()


def decode_stream(model, cfg: Config, data: bytes, sp=None) -> tuple[Header, np.ndarray, bytes]:
    """The header, the decoded token ids (checked against the model fingerprint and the ids CRC) and
    the escape section (empty for a bare token stream)."""
    require_mdlm(cfg)
    header, body = Header.decode(data)
    if len(body) < header.escape_len:
        raise CoderError("truncated escape section")
    escape, code = body[:header.escape_len], body[header.escape_len:]
    fingerprint = model_fingerprint(model, cfg, sp)
    if header.fingerprint != fingerprint:
        raise CoderError(f"made with a different model{' or tokenizer' if sp is not None else ''} "
                         f"(fingerprint {header.fingerprint.hex()}, this one {fingerprint.hex()})")
    anchors = header.anchors
    if anchors and (anchors[-1] >= header.num_tokens or len(set(anchors)) < len(anchors)):
        raise CoderError("corrupted header (anchor positions)")
    tokens = Tokens(cfg.vocab_size)
    decoder = ArithmeticDecoder(code)

    def reveal_for(batch):
        def decode(rows, logits, chosen):
            cum = cumulative_frequencies(logits[chosen], cfg.vocab_size)
            symbols = []
            for row in cum:
                total = int(row[-1])
                s = min(int(np.searchsorted(row, decoder.target(total), side="right")), cfg.vocab_size - 1)
                decoder.consume(int(row[s - 1]) if s else 0, int(row[s]), total)
                symbols.append(s)
            values = torch.full(chosen.shape, tokens.mask, dtype=torch.long)
            values[chosen] = torch.tensor(symbols, dtype=torch.long)
            return values
        return decode

    with coding_context(model):
        x = code_slices(model, header, cfg.noise_eps, tokens, reveal_for)
    ids = x.reshape(-1)[: header.num_tokens].numpy()
    if ids_crc(ids) != header.ids_crc:
        raise CoderError("decoded tokens fail their CRC (corrupted data, or a different torch/CPU)")
    return header, ids, escape


def decompress_tokens(model, cfg: Config, payload: bytes) -> np.ndarray:
    """The token ids compress_tokens coded into `payload` (int64)."""
    return decode_stream(model, cfg, payload)[1]


# ---------------------------------------------------------------- files: model text + escape channel

Edit = tuple[int, int, bytes]  # (bytes of the model text to copy, bytes of it to drop, literal to insert)


def text_tokens(sp, text: str) -> np.ndarray:
    """The text as one document: [BOS] + its ids."""
    return np.asarray([BOS_ID, *sp.encode(text)], dtype=np.int64)


def safe_characters(sp) -> str:
    """The non-space characters of the vocabulary that the tokenizer rebuilds exactly, alone and
    inside a word (NFKC-stable, not <unk>, not whitespace)."""
    pieces = (sp.id_to_piece(i) for i in range(sp.get_piece_size())
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)))
    chars = sorted(set("".join(pieces)))
    return "".join(c for c in chars if not c.isspace() and sp.decode(sp.encode(c)) == c
                   and sp.decode(sp.encode(f"a{c}a")) == f"a{c}a")


def split_input(sp, data: bytes) -> tuple[str, list[Edit]]:
    """(model text, edits): a text the tokenizer rebuilds exactly, and the edits that turn its UTF-8
    bytes into `data`. Runs of safe characters stay; a gap between them becomes one space if it holds
    whitespace (the tokenizer collapses whitespace: the model saw a space there in training), else
    nothing; the edits restore each gap's bytes."""
    text = data.decode("utf-8", "surrogateescape")  # lossless for any bytes: bad ones become lone surrogates
    chars = safe_characters(sp)
    runs = list(re.finditer(f"[{re.escape(chars)}]+", text)) if chars else []
    parts, edits, copy, last = [], [], 0, 0
    for i, run in enumerate([*runs, None]):
        gap = text[last:run.start() if run else len(text)]
        interior = i > 0 and run is not None
        if gap == " " and interior:
            parts.append(" ")
            copy += 1
        elif gap:
            space = interior and any(c.isspace() for c in gap)
            parts.append(" " if space else "")
            edits.append((copy, int(space), gap.encode("utf-8", "surrogateescape")))
            copy = 0
        if run:
            parts.append(run.group())
            copy += len(run.group().encode("utf-8"))
            last = run.end()
    model_text = "".join(parts)
    escaped = sum(len(literal) for _, _, literal in edits)
    # mostly escapes (binary, another script): model fragments cost more than they save; and a
    # tokenizer that does not rebuild the model text (a combination of safe characters) must not lose it
    if 2 * escaped > len(data) or sp.decode(sp.encode(model_text)) != model_text:
        return "", [(0, 0, data)] if data else []
    return model_text, edits


def apply_edits(base: bytes, edits: list[Edit]) -> bytes:
    """`base` with the edits applied in order; an edit past its end is a CoderError."""
    out, position = bytearray(), 0
    for copy, drop, literal in edits:
        if position + copy + drop > len(base):
            raise CoderError("corrupted escape section (an edit past the end of the text)")
        out += base[position:position + copy]
        out += literal
        position += copy + drop
    return bytes(out + base[position:])


def pack_edits(edits: list[Edit]) -> bytes:
    """The escape section: empty without edits, else a method byte and the smallest compression of
    the columns (like values together compress best)."""
    if not edits:
        return b""
    raw = bytearray()
    put_varint(raw, len(edits))
    for column in ([e[0] for e in edits], [e[1] for e in edits], [len(e[2]) for e in edits]):
        for value in column:
            put_varint(raw, value)
    raw += b"".join(e[2] for e in edits)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    candidates = [bytes(raw), deflate.compress(raw) + deflate.flush(),
                  lzma.compress(raw, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)]
    method = min(range(len(candidates)), key=lambda m: len(candidates[m]))
    return bytes([method]) + candidates[method]


def unpack_payload(method: int, payload: bytes) -> bytes:
    """The escape section's columns, decompressed by `method`."""
    try:
        if method == 0:
            return payload
        if method == 1:
            inflate = zlib.decompressobj(-15)
            raw = inflate.decompress(payload)
            if inflate.eof and not inflate.unused_data:
                return raw
        elif method == 2:
            return lzma.decompress(payload, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)
    except (zlib.error, lzma.LZMAError):
        pass
    raise CoderError("corrupted escape section")


def unpack_edits(section: bytes) -> list[Edit]:
    """The edits pack_edits wrote."""
    if not section:
        return []
    r = Reader(unpack_payload(section[0], section[1:]), "escape section")
    count = r.varint()
    if count > len(r.data):  # each edit takes at least 3 bytes: a corrupted count, not a huge list
        raise CoderError("corrupted escape section (edit count)")
    copies, drops, lengths = ([r.varint() for _ in range(count)] for _ in range(3))
    edits = [(c, d, r.take(n)) for c, d, n in zip(copies, drops, lengths)]
    if r.offset != len(r.data):
        raise CoderError("corrupted escape section (trailing bytes)")
    return edits


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
