"""The escape channel: what turns the model text back into the input's exact bytes.

Files (any bytes, lossless): the model codes [BOS] + the tokens of a "model text" that the tokenizer
rebuilds exactly (the input's in-vocabulary characters, whitespace gaps as one space); the escape
section holds the edits that turn the model text's UTF-8 bytes back into the input: per edit, bytes
to copy, bytes to drop, literal bytes to insert. It is empty when there are no edits, else a method
byte (0 stored, 1 raw deflate, 2 raw LZMA2: the smallest) and the compressed columns
uv count | copies... | drops... | literal lengths... | literals.
"""
from __future__ import annotations

import lzma
import re
import zlib

from .container import CoderError, Reader, put_varint

LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": 1 << 24}]

Edit = tuple[int, int, bytes]  # (bytes of the model text to copy, bytes of it to drop, literal to insert)


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
