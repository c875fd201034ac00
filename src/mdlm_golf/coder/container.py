"""The MDZ v2 file: a header that lets the decoder rerun the encoder's loop, then the payload.

File (all integers little-endian; "uv" = unsigned LEB128 varint):
  b"MDZ1" | version u8 | flags u8 (1: anchored, 2: a file: bytes CRC and escape section present) |
  order u8 | uv seq_len, tokens_per_pass (0 = by passes), passes (0 = by tokens per pass), batch_rows,
  num_tokens, num_anchors, anchor gaps... | CRC32 of the token ids (uint32 each) u32 |
  [CRC32 of the original bytes u32 | uv escape section length] | fingerprint of the model (+ tokenizer,
  for files) 8 bytes | CRC32 of the header so far u32 | [escape section] | code
Anchored mode gives the BOS positions (the anchors) in the header and codes every other token;
strict codes every token. Trailing zero bytes of the code are dropped (the decoder reads zeros), which
is why the code comes last.
"""
from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from ..config import Config
from ..eval import ORDERS, Schedule

MAGIC = b"MDZ1"
VERSION = 2  # 2: files are lossless (bytes CRC, escape section)
FLAG_ANCHORED, FLAG_FILE = 1, 2


class CoderError(ValueError):
    """A compressed file that cannot be decoded faithfully; the message is one line."""


def model_fingerprint(model, cfg: Config, sp=None) -> bytes:
    """First 8 bytes of sha256 over the float32 weights (names, shapes, values), vocab_size and
    noise_eps (and a block diffusion model's block size, which sets the decoding order, and an AR
    model's objective), and for text
    files the tokenizer (its serialized model), which turns ids into text."""
    coding = {"vocab_size": cfg.vocab_size, "noise_eps": cfg.noise_eps}
    if cfg.block_size:  # absent otherwise, so files written before block diffusion still decode
        coding["block_size"] = cfg.block_size
    if cfg.autoregressive:  # the same weights read as a denoiser would code differently
        coding["objective"] = cfg.objective
    h = hashlib.sha256(json.dumps(coding).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"{name}{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    if sp is not None:
        h.update(sp.serialized_model_proto())
    return h.digest()[:8]


def ids_crc(ids: np.ndarray) -> int:
    """CRC32 of the token ids as little-endian uint32s."""
    return zlib.crc32(np.asarray(ids, dtype="<u4").tobytes())


def put_varint(out: bytearray, value: int) -> None:
    """Append `value` as an unsigned LEB128 varint."""
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
        """The next `size` bytes."""
        if self.offset + size > len(self.data):
            raise CoderError(f"truncated {self.what}")
        chunk = self.data[self.offset:self.offset + size]
        self.offset += size
        return chunk

    def u32(self) -> int:
        """The next little-endian uint32."""
        return struct.unpack("<I", self.take(4))[0]

    def varint(self) -> int:
        """The next unsigned LEB128 varint."""
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
    """Everything the decoder needs to rerun the encoder's loop and check what it rebuilt."""

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
        """The header's bytes, its own CRC32 last."""
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
