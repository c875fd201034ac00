"""Export: quantize a checkpoint (a given spec, or the first AUTO_SPECS entry that fits), refuse an
oversize artifact, write it atomically. A parameter-golf entry is judged on code bytes + compressed
weights <= 16,000,000 bytes and is scored after decompression, so the artifact is what gets evaluated."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from ..checkpoint import load_model
from ..config import Config
from ..data import read_shard, shard_paths
from ..files import write_bytes_atomic
from .fileformat import encode_artifact
from .gptq import calibration_batches, collect_hessians
from .quant import SMALL_NUMEL, SpecQuantizer, spec_quantizer
from .size import LIMIT_BYTES, group_table, oversize_message, size_report

# `export --quant auto` candidates, most precise first. Each step lowers some groups and raises none, so
# every model's size falls step by step; embed and head (few params, most sensitive) stay high longest.
AUTO_SPECS = (
    "int8",
    "embed=int8,head=int8,attn=int6,mlp=int6,adaln=int8",
    "embed=int8,head=int8,attn=int6,mlp=int6,adaln=int6",
    "embed=int8,head=int8,attn=int6,mlp=int5,adaln=int6",
    "embed=int8,head=int8,attn=int5,mlp=int5,adaln=int5",
    "embed=int8,head=int8,attn=int5,mlp=int4,adaln=int5",
    "embed=int6,head=int6,attn=int5,mlp=int4,adaln=int5",
    "embed=int6,head=int6,attn=int5,mlp=int4,adaln=int4",
    "embed=int6,head=int6,attn=int4,mlp=int4,adaln=int4",
    "int4",
)
AUTO_MIN_MARGIN = 100_000  # bytes auto leaves spare under the limit
METHODS = ("rtn", "gptq")


class OversizeError(ValueError):
    """Code + artifact would exceed the byte limit; `report` holds the size report that says by how much."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def build_artifact(quantize: SpecQuantizer, cfg: Config, spec: str, *, code_bytes: int, compressor: str = "best",
                   packed: bool | None = None, method: str = "rtn", small_numel: int = SMALL_NUMEL,
                   extra: dict | None = None, limit: int = LIMIT_BYTES, attribute: bool = True
                   ) -> tuple[bytes, dict]:
    """One spec's artifact bytes (in memory, not written) and size report."""
    qtensors = quantize(spec)
    data, meta = encode_artifact(qtensors, cfg, spec, compressor=compressor, packed=packed, method=method,
                                 small_numel=small_numel, extra=extra)
    return data, size_report(qtensors, meta, len(data), code_bytes=code_bytes, limit=limit, attribute=attribute)


def choose_spec(quantize: SpecQuantizer, cfg: Config, *, specs: Iterable[str] = AUTO_SPECS,
                min_margin: int = AUTO_MIN_MARGIN, limit: int = LIMIT_BYTES, attribute: bool = True,
                **options) -> tuple[bytes, dict]:
    """The first spec whose total leaves >= min_margin under limit (else the last tried): (bytes, report).

    A spec that quantizes every tensor as an earlier one did (it differs only in a group the model
    lacks or whose tensors all stay fp16) is skipped: it would give the same artifact.
    `options` go to build_artifact (code_bytes, compressor, packed, method, small_numel, extra).
    """
    tried, seen, skipped, best = [], set(), [], None
    for spec in specs:
        formats = tuple((qt.name, qt.format) for qt in quantize(spec))
        if formats in seen:
            skipped.append(spec)
            continue
        seen.add(formats)
        data, report = build_artifact(quantize, cfg, spec, limit=limit, attribute=False, **options)
        tried.append({"spec": spec, "total_bytes": report["total_bytes"], "margin": report["margin_bytes"]})
        best = (spec, data, report)
        if report["margin_bytes"] >= min_margin:
            break
    if best is None:
        raise ValueError("quant auto: no candidate specs")
    spec, data, report = best
    if attribute:  # per-group compression, for the chosen spec only
        report["groups"] = group_table(quantize(spec), report["packed"], report["compressor"])
    report.update(spec_requested="auto", min_margin=min_margin, auto_tried=tried, auto_skipped=skipped)
    return data, report


def calibration_hessians(model: torch.nn.Module, cfg: Config, method: str, calib_data: Path | None,
                    calib_batches: int, calib_rows: int) -> dict[str, torch.Tensor] | None:
    """GPTQ's Hessians from calibration batches of the train shards; None for rtn."""
    if method not in METHODS:
        raise ValueError(f"quantization method must be one of {METHODS}, got {method!r}")
    if method != "gptq":
        return None
    if calib_data is None:
        raise ValueError("method 'gptq' needs calibration data (a folder with fineweb_train_*.bin)")
    train_tokens = read_shard(shard_paths(calib_data, "train")[0], cfg.vocab_size)
    return collect_hessians(model, calibration_batches(cfg, train_tokens, calib_batches, calib_rows, seed=cfg.seed))


def export_artifact(checkpoint_path: Path, out_path: Path, spec: str, compressor: str = "best", *,
                    code_bytes: int, method: str = "rtn", packed: bool | None = None,
                    small_numel: int = SMALL_NUMEL, calib_data: Path | None = None, calib_batches: int = 8,
                    calib_rows: int = 8, limit: int = LIMIT_BYTES, allow_oversize: bool = False,
                    attribute: bool = True, min_margin: int = AUTO_MIN_MARGIN) -> dict:
    """Quantize a checkpoint, compress it, refuse if code + artifact > limit, write atomically; the size report.

    code_bytes: the size of the record script that ships with it (submission.build_script's text).
    spec "auto" takes the first of AUTO_SPECS that leaves >= min_margin bytes under the limit.
    """
    model, cfg, state = load_model(checkpoint_path)
    hessians = calibration_hessians(model, cfg, method, calib_data, calib_batches, calib_rows)
    quantize = spec_quantizer(model.state_dict(), cfg, small_numel=small_numel, hessians=hessians)
    options = dict(code_bytes=code_bytes, compressor=compressor, packed=packed, method=method,
                   small_numel=small_numel, extra={"tokenizer": state.get("tokenizer")}, limit=limit,
                   attribute=attribute)
    if spec == "auto":
        data, report = choose_spec(quantize, cfg, min_margin=min_margin, **options)
        short = report["margin_bytes"] < min_margin
    else:
        data, report = build_artifact(quantize, cfg, spec, **options)
        short = not report["fits"]
    report["artifact"] = str(out_path)
    if short and not allow_oversize:
        raise OversizeError(oversize_message(Path(out_path), report), report)
    write_bytes_atomic(Path(out_path), data)
    return report
