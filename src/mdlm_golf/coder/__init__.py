"""A lossless compressor that realizes the planned-order code length (`mdlm-golf compress/decompress`).

arithmetic: the integer arithmetic coder and the model's quantized frequencies; container: the MDZ v2
header and file layout; escape: the escape channel for bytes the tokenizer cannot rebuild; codec:
compress and decompress token streams and files with the model.
"""
from .arithmetic import TOTAL, ArithmeticDecoder, ArithmeticEncoder, cumulative_frequencies
from .codec import (BATCH_ROWS, CODER_MODES, compress_file, compress_tokens, decode_stream, decompress_file,
                    decompress_tokens, text_tokens)
from .container import MAGIC, VERSION, CoderError, Header, model_fingerprint
from .escape import Edit, apply_edits, pack_edits, split_input, unpack_edits

__all__ = [
    "BATCH_ROWS", "CODER_MODES", "MAGIC", "TOTAL", "VERSION", "ArithmeticDecoder", "ArithmeticEncoder",
    "CoderError", "Edit", "Header", "apply_edits", "compress_file", "compress_tokens",
    "cumulative_frequencies", "decode_stream", "decompress_file", "decompress_tokens",
    "model_fingerprint", "pack_edits", "split_input", "text_tokens", "unpack_edits",
]
