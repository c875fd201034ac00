"""Size accounting under the 16 MB rule: code bytes (the record script) + artifact bytes <= LIMIT_BYTES."""
from __future__ import annotations

import math
from pathlib import Path

from .compress import compressor_functions
from .fileformat import tensor_bytes
from .quant import GROUPS, QuantTensor

LIMIT_BYTES = 16_000_000  # decimal: the challenge's cap on code + compressed weights
CODE_LABEL = "code (record script)"  # what code_bytes counts: the one file a record ships, train_mdlm.py


def group_table(qtensors: list[QuantTensor], packed: bool, compressor: str | None) -> list[dict]:
    """Per group: params, fp32 bytes, bytes before compression, and (if asked) compressed on its own."""
    rows = []
    for group in GROUPS:
        members = [qt for qt in qtensors if qt.group == group]
        raw = b"".join(tensor_bytes(qt, packed) for qt in members)
        row = {"group": group, "tensors": len(members),
               "formats": sorted({qt.format for qt in members}),
               "params": sum(math.prod(qt.shape) for qt in members),
               "fp32_bytes": 4 * sum(math.prod(qt.shape) for qt in members), "quant_bytes": len(raw)}
        if compressor is not None:
            row["compressed_bytes"] = len(compressor_functions(compressor)[0](raw)) if raw else 0
        rows.append(row)
    return rows


def size_report(qtensors: list[QuantTensor], meta: dict, artifact_bytes: int, *, code_bytes: int,
                limit: int = LIMIT_BYTES, attribute: bool = True) -> dict:
    """Everything the 16 MB rule needs: per-group table, artifact, code, total, limit and margin.

    code_bytes is the size of the record script that ships with the artifact (submission.build_script).
    """
    total = code_bytes + artifact_bytes
    return {"spec": meta["spec"], "method": meta["method"], "compressor": meta["compressor"],
            "packed": meta["packed"], "groups": group_table(qtensors, meta["packed"],
                                                            meta["compressor"] if attribute else None),
            "raw_bytes": meta["raw_bytes"], "payload_bytes": meta["payload_bytes"],
            "header_bytes": artifact_bytes - meta["payload_bytes"], "artifact_bytes": artifact_bytes,
            "compressed_sizes": meta.get("compressed_sizes", {}), "code_bytes": code_bytes,
            "total_bytes": total, "limit_bytes": limit, "margin_bytes": limit - total, "fits": total <= limit}


def oversize_message(out_path: Path, report: dict) -> str:
    """One line: by how much code + artifact misses the limit (or, for auto, the required margin)."""
    sizes = (f"code {report['code_bytes']:,} + artifact {report['artifact_bytes']:,} = "
             f"{report['total_bytes']:,} bytes")
    if report.get("spec_requested") == "auto":
        return (f"{out_path}: quant auto: no spec leaves {report['min_margin']:,} bytes under the "
                f"{report['limit_bytes']:,}-byte limit; the least precise, {report['spec']}, totals {sizes} "
                f"(margin {report['margin_bytes']:,}); not written (allow oversize to write it anyway)")
    return (f"{out_path}: {sizes} exceeds the {report['limit_bytes']:,}-byte limit by "
            f"{-report['margin_bytes']:,}; not written (allow oversize to write it anyway)")


def format_size_table(report: dict) -> str:
    """The report as a table: groups, then artifact, code, total, limit and margin."""
    lines = [f"spec {report['spec']} | method {report['method']} | compressor {report['compressor']} | "
             f"{'bit-packed' if report['packed'] else 'one code per byte'}",
             *auto_lines(report),
             f"{'group':8s} {'formats':>12s} {'params':>12s} {'fp32 bytes':>13s} {'quant bytes':>13s} "
             f"{'compressed*':>13s}"]
    for r in report["groups"] + [total_row(report["groups"])]:
        compressed = f"{r['compressed_bytes']:,}" if "compressed_bytes" in r else "-"
        lines.append(f"{r['group']:8s} {'/'.join(r['formats']):>12s} {r['params']:>12,} {r['fp32_bytes']:>13,} "
                     f"{r['quant_bytes']:>13,} {compressed:>13s}")
    if "compressed_bytes" in report["groups"][0]:
        lines.append("* each group compressed on its own, for attribution; the artifact compresses "
                     "the whole payload once")
    if len(report["compressed_sizes"]) > 1:
        lines.append("compressors tried: " + ", ".join(f"{n} {b:,}" for n, b in report["compressed_sizes"].items()))
    verdict = "fits" if report["fits"] else f"OVER by {-report['margin_bytes']:,}"
    lines += [f"{'payload (compressed once)':28s} {report['payload_bytes']:>12,}",
              f"{'header + metadata':28s} {report['header_bytes']:>12,}",
              f"{'artifact file':28s} {report['artifact_bytes']:>12,}",
              f"{CODE_LABEL:28s} {report['code_bytes']:>12,}",
              f"{'total':28s} {report['total_bytes']:>12,}",
              f"{'limit':28s} {report['limit_bytes']:>12,}",
              f"{'margin':28s} {report['margin_bytes']:>12,}  ({verdict})"]
    return "\n".join(lines)


def auto_lines(report: dict) -> list[str]:
    """For spec auto: which spec it chose, and every spec it tried with its total bytes."""
    if report.get("spec_requested") != "auto":
        return []
    tried = ", ".join(f"{t['spec']} {t['total_bytes']:,}" for t in report["auto_tried"])
    return [f"quant auto chose {report['spec']} (tried: {tried}; needs margin >= {report['min_margin']:,})"]


def total_row(groups: list[dict]) -> dict:
    """The sum of the group rows (compressed bytes summed over separately compressed groups)."""
    row = {"group": "total", "formats": sorted({f for g in groups for f in g["formats"]}),
           **{k: sum(g[k] for g in groups) for k in ("params", "fp32_bytes", "quant_bytes")}}
    if groups and "compressed_bytes" in groups[0]:
        row["compressed_bytes"] = sum(g["compressed_bytes"] for g in groups)
    return row
