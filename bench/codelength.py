"""Exact planned-order code length vs the ELBO bound, and the MDZ1 coder against gzip/xz/zstd.

    python bench/codelength.py --run RUN --data DIR [--tokenizer MODEL] [--num-seqs 16]
        [--passes 16,64,128,256,L] [--max-passes 256] [--elbo-steps 64,128,256,512] [--docs 3]
        [--texts FILE.jsonl] [--coder-order confidence] [--coder-passes 64] [--out PREFIX]

(a) bpb on the first --num-seqs val slices, both modes: planned-order code length for each P of
    --passes (<= --max-passes and L) and every order, next to the ELBO for each T of --elbo-steps;
    as a table of bpb against network evaluations per slice, a PNG plot and a JSON file
    (PREFIX.png, PREFIX.json; default RUN/codelength).
(b) the first --docs val documents, decoded to text with the tokenizer (or, with --texts FILE.jsonl, the
    last --docs documents of that file as they are written there), compressed with the MDZ1
    coder (--coder-order, --coder-passes) and decompressed: file and code bits per byte of the
    text next to the planned-order code length of the same tokens (the coder's overhead), and
    gzip -9, xz -9 and zstd -19 (if `zstandard` is installed) of the same text.
"""
from __future__ import annotations

import argparse
import gzip
import json
import lzma
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mdlm_golf.checkpoint import load_model, run_checkpoint
from mdlm_golf.coder import BATCH_ROWS, compress_file, decompress_file, split_input, text_tokens
from mdlm_golf.config import BOS_ID, write_text_atomic
from mdlm_golf.data import ByteTable, load_split, load_tokenizer
from mdlm_golf.data.corpus import iter_docs
from mdlm_golf.eval import evaluate
from mdlm_golf.eval.harness import make_slices
from mdlm_golf.eval.planned import ORDERS, planned_bits

MODES = ("strict", "anchored")


def parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def tokenizer_path(args, state: dict) -> Path:
    if args.tokenizer:
        return Path(args.tokenizer)
    if state.get("tokenizer"):
        return Path(state["tokenizer"])
    return Path(json.loads((Path(args.data) / "manifest.json").read_text())["tokenizer"])


def code_length_rows(model, val, table, cfg, args, device) -> list[dict]:
    """One row per (method, order, passes or steps): bpb of both modes and evaluations per slice."""
    rows = []
    wanted = [cfg.seq_len if v.strip() == "L" else int(v) for v in args.passes.split(",") if v.strip()]
    passes = sorted({p for p in wanted if p <= min(cfg.seq_len, args.max_passes)})
    for order in args.orders:
        for p in passes:
            r = evaluate(model, val, table, cfg, method="planned", order=order, passes=p, num_seqs=args.num_seqs,
                         modes=MODES, device=device)
            rows.append({"method": "planned", "order": order, "passes": p, "evals": r["strict"]["passes"],
                         **{f"bpb_{m}": r[m]["bpb"] for m in MODES},
                         "seconds": sum(r[m]["eval_seconds"] for m in MODES), "results": r})
            print(row_line(rows[-1]), flush=True)
    for steps in args.elbo_steps:
        r = evaluate(model, val, table, cfg, steps=steps, num_seqs=args.num_seqs, seed=0, modes=MODES,
                     device=device)
        rows.append({"method": "elbo", "order": "-", "passes": steps, "evals": steps,
                     **{f"bpb_{m}": r[m]["bpb"] for m in MODES},
                     "seconds": sum(r[m]["eval_seconds"] for m in MODES), "results": r})
        print(row_line(rows[-1]), flush=True)
    return rows


def row_line(row: dict) -> str:
    bound = "exact" if row["method"] == "planned" else "bound"
    return (f"{row['method']:8s} {row['order']:14s} {row['evals']:8.1f} {row['bpb_strict']:10.4f} "
            f"{row['bpb_anchored']:10.4f}  {bound:5s} {row['seconds']:8.1f}")


HEADER = (f"{'method':8s} {'order':14s} {'evals':>8s} {'strict':>10s} {'anchored':>10s}  {'':5s} "
          f"{'seconds':>8s}\n" + "-" * 64)


def plot(rows: list[dict], seq_len: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, mode in zip(axes, MODES):
        for method, order in [("planned", o) for o in ORDERS] + [("elbo", "-")]:
            sel = [r for r in rows if r["method"] == method and r["order"] == order]
            if sel:
                label = f"planned, {order}" if method == "planned" else "ELBO (upper bound)"
                ax.plot([r["evals"] for r in sel], [r[f"bpb_{mode}"] for r in sel],
                        "--s" if method == "elbo" else "-o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"network evaluations per slice (L = {seq_len})")
        ax.set_title(mode)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("bits per byte")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def val_documents(val: np.ndarray, count: int) -> list[np.ndarray]:
    starts = np.flatnonzero(val == BOS_ID)
    ends = np.append(starts[1:], val.size)
    return [val[a + 1:b].astype(np.int64) for a, b in zip(starts[:count], ends[:count])]


def baselines(raw: bytes) -> dict[str, int]:
    out = {"gzip -9": len(gzip.compress(raw, 9)), "xz -9": len(lzma.compress(raw, preset=9))}
    try:
        import zstandard
    except ImportError:
        return out
    out["zstd -19"] = len(zstandard.ZstdCompressor(level=19).compress(raw))
    return out


def coder_inputs(sp, val: np.ndarray, args) -> list[bytes]:
    """The texts to compress: the last --docs documents of --texts as they are written there (characters
    the tokenizer cannot rebuild included), else the first --docs val documents decoded to text."""
    if args.texts:
        return [text.encode("utf-8") for text in list(iter_docs(Path(args.texts)))[-args.docs:]]
    return [sp.decode(ids.tolist()).encode("utf-8") for ids in val_documents(val, args.docs)]


def coder_rows(cpu_model, cfg, sp, table, val, args) -> list[dict]:
    """Compress the --docs texts with MDZ1 and the standard compressors, and decompress them."""
    schedule = dict(passes=min(args.coder_passes, cfg.seq_len))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, raw in enumerate(coder_inputs(sp, val, args)):
            path = Path(tmp) / f"doc{i}.mdz"
            began = time.perf_counter()
            info = compress_file(cpu_model, cfg, sp, raw, path, order=args.coder_order, **schedule)
            mid = time.perf_counter()
            back = decompress_file(cpu_model, cfg, sp, path)
            done = time.perf_counter()
            stream = text_tokens(sp, split_input(sp, raw)[0])  # what the model codes; the rest is escaped
            slices = make_slices(stream, cfg.seq_len, 0, table, cfg.tokens.pad)
            with torch.no_grad():
                ideal = planned_bits(cpu_model, slices, "anchored", args.coder_order, eps=cfg.noise_eps,
                                     vocab_size=cfg.vocab_size, batch_rows=BATCH_ROWS,
                                     device=torch.device("cpu"), **schedule).sum()
            rows.append({"doc": i, "tokens": info["tokens"], "text_bytes": len(raw),
                         "escaped_bytes": info["escaped_bytes"], "exact": back == raw,
                         "code_length_bits": float(ideal), "code_bits": 8 * info["code_bytes"],
                         "file_bits": 8 * info["file_bytes"], "header_bytes": info["header_bytes"],
                         "compress_s": mid - began, "decompress_s": done - mid,
                         **{k: 8 * v for k, v in baselines(raw).items()}})
    return rows


def print_coder(rows: list[dict], order: str, passes: int) -> dict:
    names = [k for k in ("gzip -9", "xz -9", "zstd -19") if k in rows[0]]
    print(f"\nMDZ1 coder ({order}, {passes} passes per slice, anchored), bits per byte of the text:")
    print(f"{'doc':>4s} {'tokens':>7s} {'bytes':>7s} {'code len':>9s} {'code':>7s} {'file':>7s} "
          f"{'overhead':>9s} " + " ".join(f"{n:>8s}" for n in names)
          + f" {'enc s':>6s} {'dec s':>6s} escaped exact")
    total = {k: sum(r[k] for r in rows) for k in ("tokens", "text_bytes", "code_length_bits", "code_bits",
                                                   "file_bits", "compress_s", "decompress_s", *names)}
    everything = dict(total, doc="all", exact=all(r["exact"] for r in rows),
                      escaped_bytes=sum(r["escaped_bytes"] for r in rows))
    for r in rows + [everything]:
        b = r["text_bytes"]
        print(f"{r['doc']!s:>4s} {r['tokens']:7d} {b:7d} {r['code_length_bits'] / b:9.4f} "
              f"{r['code_bits'] / b:7.4f} {r['file_bits'] / b:7.4f} "
              f"{r['code_bits'] - r['code_length_bits']:8.1f}b "
              + " ".join(f"{r[n] / b:8.4f}" for n in names)
              + f" {r['compress_s']:6.1f} {r['decompress_s']:6.1f} {r['escaped_bytes']:7d}"
              f" {'yes' if r['exact'] else 'NO'}")
    print("code len: planned-order code length of the same tokens; code: the arithmetic code; file: with "
          "the header; overhead: code - code len in bits;\nescaped: input bytes coded outside the model "
          "(characters the tokenizer cannot rebuild); exact: decompression returned the input byte for byte")
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="run folder with model.pt")
    parser.add_argument("--data", required=True, help="folder with fineweb_val_*.bin")
    parser.add_argument("--tokenizer", help="SentencePiece model (default: the run's)")
    parser.add_argument("--num-seqs", type=int, default=16, help="val slices for the bpb table")
    parser.add_argument("--passes", default="16,64,128,256,L", help="comma-separated P; L = seq_len")
    parser.add_argument("--max-passes", type=int, default=256, help="largest P (CPU: keep it small)")
    parser.add_argument("--orders", default=",".join(ORDERS), help="comma-separated planned orders")
    parser.add_argument("--elbo-steps", default="64,128,256,512", help="comma-separated ELBO steps")
    parser.add_argument("--docs", type=int, default=3, help="documents to compress (0 = none)")
    parser.add_argument("--texts", help="JSONL of {\"text\": ...}: compress its last --docs documents "
                        "byte for byte instead of decoded val documents")
    parser.add_argument("--coder-order", default="confidence", choices=ORDERS)
    parser.add_argument("--coder-passes", type=int, default=64, help="passes per slice for the coder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="output prefix for .png and .json (default RUN/codelength)")
    args = parser.parse_args(argv)
    args.orders = [o for o in args.orders.split(",") if o]
    args.elbo_steps = parse_ints(args.elbo_steps)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny models lose to thread hand-offs; the coder needs one anyway
    out = Path(args.out) if args.out else Path(args.run) / "codelength"

    model, cfg, state = load_model(run_checkpoint(Path(args.run)), device)
    sp = load_tokenizer(tokenizer_path(args, state))
    table = ByteTable.from_tokenizer(sp, cfg.vocab_size)
    val = load_split(Path(args.data), "val", cfg.vocab_size)
    print(f"run {args.run}: {model.num_params():,} params, L = {cfg.seq_len}, step {state.get('step')}; "
          f"{args.num_seqs} val slices; device {device} ({platform.processor() or platform.machine()}); "
          f"torch {torch.__version__}")
    print(HEADER)
    rows = code_length_rows(model, val, table, cfg, args, device)
    title = f"{args.run}: {args.num_seqs} val slices x {cfg.seq_len} tokens"
    plot(rows, cfg.seq_len, out.with_suffix(".png"), title)
    report = {"run": str(args.run), "seq_len": cfg.seq_len, "num_seqs": args.num_seqs, "device": str(device),
              "torch": torch.__version__, "rows": rows}
    if args.docs:
        cpu_model = model if device.type == "cpu" else load_model(run_checkpoint(Path(args.run)), "cpu")[0]
        coded = coder_rows(cpu_model, cfg, sp, table, val, args)
        report["coder"] = {"order": args.coder_order, "passes": min(args.coder_passes, cfg.seq_len),
                           "docs": coded, "total": print_coder(coded, args.coder_order,
                                                               min(args.coder_passes, cfg.seq_len))}
    write_text_atomic(out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out.with_suffix('.png')} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
