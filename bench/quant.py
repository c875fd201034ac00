"""Artifact size under the 16,000,000-byte rule: quant specs x compressors x code layouts, and the bpb cost.

    python bench/quant.py [--run RUN] [--data DIR] [--spec SPEC ...] [--compressors zlib,lzma,zstd,brotli]
        [--method rtn|gptq|both] [--small-numel 65536] [--num-seqs 8] [--elbo-steps 32] [--threads N]
        [--json PATH]

Without --run: the reference configuration (build_config(None, environ={}), 11 layers x 512) with
SYNTHETIC weights: Student-t(5) values, std 0.02, a log-normal scale per row, adaLN and head non-zero.
They are not trained weights, and trained weights compress differently (heavier tails give fewer
distinct codes per row at the same format): treat those sizes as a guide, not a measurement.
With --run RUN: RUN/model.pt as trained. Adding --data DIR evaluates the strict ELBO bpb of the
float model and of each spec's round trip on the same mask draws (--num-seqs slices), and takes
GPTQ's calibration batches from DIR's first train shard.

For each spec and method: quantization time; for each compressor and code layout (bit-packed, or one
code per byte): the artifact's exact file bytes, compress/decompress seconds, code bytes (the record
script train_mdlm.py that `mdlm-golf submission` writes), total and margin. Ends with one row per spec: its smallest artifact, and the bpb.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mdlm_golf.artifact.compress import available_compressors, compressor_functions  # noqa: E402
from mdlm_golf.artifact.fileformat import encode_artifact, layout_name, read_meta  # noqa: E402
from mdlm_golf.artifact.gptq import calibration_batches, collect_hessians  # noqa: E402
from mdlm_golf.artifact.quant import (  # noqa: E402
    FORMAT_BITS, QuantTensor, dequantize_state_dict, parse_spec, spec_quantizer)
from mdlm_golf.artifact.size import LIMIT_BYTES  # noqa: E402
from mdlm_golf.checkpoint import load_model, run_checkpoint  # noqa: E402
from mdlm_golf.config import Config, build_config  # noqa: E402
from mdlm_golf.data import ByteTable, load_split, load_tokenizer, read_shard, shard_paths  # noqa: E402
from mdlm_golf.eval import evaluate  # noqa: E402
from mdlm_golf.model import Transformer  # noqa: E402
from mdlm_golf.submission import SCRIPT_NAME, script_bytes  # noqa: E402

DEFAULT_SPECS = ["int8", "int6,embed=int8,head=int8", "int6", "int6,mlp=int4", "int5", "int5,mlp=int4",
                 "int4,embed=int8,head=int8", "int4"]


def synthetic_model(seed: int = 0) -> Transformer:
    """The reference model with heavy-tailed random weights standing in for trained ones."""
    torch.manual_seed(seed)
    model = Transformer(build_config(None, environ={}))
    t = torch.distributions.StudentT(5.0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(t.sample(p.shape) * 0.02 / (5.0 / 3.0) ** 0.5)  # Student-t(5) variance is 5/3
            if p.dim() == 2:
                p.mul_(torch.exp(0.3 * torch.randn(p.size(0), 1)))
    return model.eval()


def roundtrip_model(model: Transformer, qtensors: list[QuantTensor]) -> Transformer:
    """A copy of the model carrying the dequantized weights (what the artifact loads as)."""
    copy = Transformer(model.cfg)
    copy.load_state_dict(dequantize_state_dict(qtensors))
    return copy.to(next(model.parameters()).device)


def quantization_penalty(model: torch.nn.Module, quantized: torch.nn.Module, val_tokens, byte_table,
                         cfg: Config, *, steps: int, num_seqs: int, seed: int = 0,
                         device: torch.device | None = None, reference: dict | None = None) -> dict:
    """Strict bpb before and after quantization on the same mask draws: the gap is the penalty, not noise.

    `reference` is the float model's strict result from an earlier call with the same settings
    (it saves re-evaluating the float model for every spec).
    """
    def strict(m: torch.nn.Module) -> dict:
        return evaluate(m, val_tokens, byte_table, cfg, steps=steps, num_seqs=num_seqs, seed=seed,
                        modes=("strict",), device=device)["strict"]

    before = reference if reference is not None else strict(model)
    after = strict(quantized)
    return {"float": before, "quantized": after, "delta_bpb": after["bpb"] - before["bpb"]}


def eval_inputs(args, cfg, state: dict):
    tokenizer = args.tokenizer or state.get("tokenizer")
    if not tokenizer:
        tokenizer = json.loads((Path(args.data) / "manifest.json").read_text())["tokenizer"]
    byte_table = ByteTable.from_tokenizer(load_tokenizer(Path(tokenizer)), cfg.vocab_size)
    return load_split(Path(args.data), "val", cfg.vocab_size), byte_table


def measure(qtensors, cfg, spec: str, method: str, compressors: list[str], small_numel: int,
            code: int) -> list[dict]:
    """One row per (compressor, layout): exact artifact bytes, timings, total and margin."""
    sub_byte = any(FORMAT_BITS[f] < 8 for f in parse_spec(spec).values())
    rows = []
    for packed in ([True, False] if sub_byte else [False]):  # int8/fp16 alone: nothing to pack
        for name in compressors:
            began = time.perf_counter()
            data, meta = encode_artifact(qtensors, cfg, spec, compressor=name, packed=packed, method=method,
                                         small_numel=small_numel)
            encode_s = time.perf_counter() - began
            _, payload = read_meta(Path("<memory>"), data)
            began = time.perf_counter()
            compressor_functions(name)[1](payload)
            decode_s = time.perf_counter() - began
            total = code + len(data)
            rows.append({"spec": spec, "method": method, "compressor": name, "layout": layout_name(packed),
                         "raw_bytes": meta["raw_bytes"], "payload_bytes": meta["payload_bytes"],
                         "artifact_bytes": len(data), "code_bytes": code, "total_bytes": total,
                         "margin_bytes": LIMIT_BYTES - total, "encode_s": encode_s, "decompress_s": decode_s})
            r = rows[-1]
            print(f"  {name:6s} {r['layout']:6s} raw {r['raw_bytes']:>11,} -> artifact {len(data):>11,} | "
                  f"total {total:>11,} | margin {r['margin_bytes']:>12,} | encode {encode_s:6.1f}s "
                  f"decompress {decode_s:5.2f}s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="run folder with model.pt (default: synthetic reference weights)")
    parser.add_argument("--data", help="data folder: strict bpb before/after (needs --run), GPTQ calibration")
    parser.add_argument("--tokenizer", help="SentencePiece model (default: the run's, else DATA/manifest.json)")
    parser.add_argument("--spec", action="append", help=f"quant spec (repeatable; default {DEFAULT_SPECS})")
    parser.add_argument("--compressors", default=",".join(available_compressors()))
    parser.add_argument("--method", choices=("rtn", "gptq", "both"), default="rtn")
    parser.add_argument("--small-numel", type=int, default=65_536, help="tensors under this stay fp16")
    parser.add_argument("--num-seqs", type=int, default=8)
    parser.add_argument("--elbo-steps", type=int, default=32)
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--calib-rows", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--json", help="write every row as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    compressors = [c.strip() for c in args.compressors.split(",") if c.strip()]
    methods = ["rtn", "gptq"] if args.method == "both" else [args.method]

    state: dict = {}
    if args.run:
        model, cfg, state = load_model(run_checkpoint(Path(args.run)))
        source = f"TRAINED weights from {args.run} (step {state.get('step', '?')})"
    else:
        model, cfg = synthetic_model(), build_config(None, environ={})
        source = "SYNTHETIC weights (random Student-t(5), not trained: sizes are indicative only)"
    model = model.to(device)
    code = script_bytes()
    print(f"mdlm-golf quant bench | python {platform.python_version()} | torch {torch.__version__} | "
          f"device {device} | threads {torch.get_num_threads()} | cpu {platform.processor() or platform.machine()}")
    print(f"model: {source}; {model.num_params():,} parameters ({cfg.num_layers} layers, width {cfg.model_dim}, "
          f"MLP x{cfg.mlp_mult}); tensors under {args.small_numel:,} values kept fp16")
    print(f"code: {code:,} bytes (the record script {SCRIPT_NAME}); limit {LIMIT_BYTES:,}")

    val = byte_table = reference = calibration = None
    if args.data and args.run:
        val, byte_table = eval_inputs(args, cfg, state)
        began = time.perf_counter()
        reference = quantization_penalty(model, model, val, byte_table, cfg, steps=args.elbo_steps,
                                         num_seqs=args.num_seqs, device=device)["float"]
        print(f"float strict bpb {reference['bpb']:.4f} ({args.num_seqs} slices, {args.elbo_steps}-step ELBO, "
              f"{time.perf_counter() - began:.1f}s)")
    if "gptq" in methods:
        if not args.data:
            parser.error("--method gptq needs --data DIR for calibration batches")
        train_tokens = read_shard(shard_paths(Path(args.data), "train")[0], cfg.vocab_size)
        calibration = [(x.to(device), s.to(device)) for x, s in
                       calibration_batches(cfg, train_tokens, args.calib_batches, args.calib_rows, seed=cfg.seed)]

    rows, summary = [], []
    hessians = {"rtn": None}
    if "gptq" in methods:
        began = time.perf_counter()
        hessians["gptq"] = collect_hessians(model, calibration)
        print(f"GPTQ Hessians from {len(calibration)} calibration batches in {time.perf_counter() - began:.1f}s")
    for spec in args.spec or DEFAULT_SPECS:
        for method in methods:
            began = time.perf_counter()  # a fresh quantizer: nothing cached from an earlier spec
            qtensors = spec_quantizer(model.state_dict(), cfg, small_numel=args.small_numel,
                                      hessians=hessians[method])(spec)
            quant_s = time.perf_counter() - began
            print(f"{spec} [{method}] quantized in {quant_s:.1f}s", flush=True)
            spec_rows = measure(qtensors, cfg, spec, method, compressors, args.small_numel, code)
            best = min(spec_rows, key=lambda r: r["artifact_bytes"])
            line = {**best, "quant_s": quant_s}
            if reference is not None:
                result = quantization_penalty(model, roundtrip_model(model, qtensors), val, byte_table, cfg,
                                              steps=args.elbo_steps, num_seqs=args.num_seqs, device=device,
                                              reference=reference)
                line.update(float_bpb=reference["bpb"], quant_bpb=result["quantized"]["bpb"],
                            delta_bpb=result["delta_bpb"])
                print(f"  strict bpb {reference['bpb']:.4f} -> {line['quant_bpb']:.4f} "
                      f"({line['delta_bpb']:+.4f})", flush=True)
            rows += spec_rows
            summary.append(line)

    print(f"\nsummary ({source}); smallest artifact per spec; code {code:,} bytes; limit {LIMIT_BYTES:,}")
    head = f"{'spec':28s} {'method':6s} {'best':13s} {'artifact':>11s} {'total':>11s} {'margin':>12s}"
    print(head + (f" {'bpb float':>9s} {'bpb quant':>9s} {'delta':>8s}" if reference else ""))
    for r in summary:
        text = (f"{r['spec']:28s} {r['method']:6s} {r['compressor'] + '/' + r['layout']:13s} "
                f"{r['artifact_bytes']:>11,} {r['total_bytes']:>11,} {r['margin_bytes']:>12,}")
        if reference:
            text += f" {r['float_bpb']:>9.4f} {r['quant_bpb']:>9.4f} {r['delta_bpb']:>+8.4f}"
        print(text + ("" if r["margin_bytes"] >= 0 else "  OVER"))
    if args.json:
        Path(args.json).write_text(json.dumps({"source": source, "rows": rows, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
