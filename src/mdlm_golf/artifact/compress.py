"""Payload compressors: zlib and lzma from the standard library, zstd and brotli where installed."""
from __future__ import annotations

import io
import lzma
import zlib
from typing import Callable

COMPRESSORS = ("zlib", "lzma", "zstd", "brotli")

Codec = tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]


def compressor_functions(name: str) -> Codec:
    """(compress, decompress) at each library's strongest setting."""
    if name == "zlib":
        return (lambda b: zlib.compress(b, 9)), zlib.decompress
    if name == "lzma":
        return (lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME, check=lzma.CHECK_NONE),
                lzma.decompress)
    if name == "zstd":
        return zstd_functions()
    if name == "brotli":
        return brotli_functions()
    raise ValueError(f"unknown compressor {name!r} (choose from {', '.join(COMPRESSORS)} or 'best')")


def zstd_functions() -> Codec:
    """zstd level 22; imported here because zstandard is an optional package."""
    try:
        import zstandard
    except ImportError:
        raise ValueError("compressor 'zstd' needs the zstandard package "
                         "(pip install zstandard, or mdlm-golf[compress])") from None
    return (lambda b: zstandard.ZstdCompressor(level=22).compress(b),
            lambda b: zstandard.ZstdDecompressor().decompress(b))


def brotli_functions() -> Codec:
    """brotli quality 11; imported here because brotli is an optional package."""
    try:
        import brotli
    except ImportError:
        raise ValueError("compressor 'brotli' needs the brotli package "
                         "(pip install brotli, or mdlm-golf[compress])") from None
    return (lambda b: brotli.compress(b, quality=11, lgwin=24)), brotli.decompress


def available_compressors() -> list[str]:
    """The compressors whose libraries are installed (zlib and lzma always are)."""
    available = []
    for name in COMPRESSORS:
        try:
            compressor_functions(name)
        except ValueError:
            continue
        available.append(name)
    return available


def compress(raw: bytes, compressor: str) -> tuple[str, bytes, dict[str, int]]:
    """(name, blob, sizes tried); 'best' tries every available compressor and keeps the smallest."""
    names = available_compressors() if compressor == "best" else [compressor]
    blobs = {name: compressor_functions(name)[0](raw) for name in names}
    best = min(blobs, key=lambda n: len(blobs[n]))
    return best, blobs[best], {n: len(b) for n, b in blobs.items()}


def decompress_bounded(name: str, payload: bytes, size: int) -> bytes:
    """The payload decompressed to at most about size + 1 bytes: a stream that would expand past what
    its table states stops there (the caller refuses it), rather than filling memory."""
    limit = size + 1
    if name == "zlib":
        return zlib.decompressobj().decompress(payload, limit)
    if name == "lzma":
        return lzma.LZMADecompressor().decompress(payload, max_length=limit)
    if name == "zstd":
        zstd_functions()  # the one-line error when zstandard is missing
        import zstandard  # optional package, as in zstd_functions

        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(payload)).read(limit)
    if name == "brotli":
        brotli_functions()
        import brotli  # optional package, as in brotli_functions

        try:
            return brotli.Decompressor().process(payload, output_buffer_limit=limit)[:limit]
        except TypeError:  # brotli < 1.1 has no output limit
            return brotli.decompress(payload)[:limit]
    return compressor_functions(name)[1](payload)
