"""ShardedLoader benchmark: peak RSS vs its buffer, batch throughput, time waiting for group loads.

    python bench/loader.py [--docs ../shared/data/docs_selected.jsonl]
        [--tokenizer ../shared/data/tokenizers/fineweb_1024_bpe.model]
        [--shards 8] [--shard-tokens 1000000] [--shards-per-group 2]

Tokenizes the shared corpus once, repeats it to fill --shards shards of --shard-tokens tokens in
a temporary folder, then
  (a) in a fresh subprocess, iterates 1.5 epochs (>= all shards) with a simulated training step
      per batch and reports peak RSS (VmHWM, reset after imports) minus the RSS before the
      loader existed, next to the loader's buffer bytes;
  (b) measures batch assembly throughput (tokens/s) of next_rows for both layouts;
  (c) reports the time next_rows waited for group loads in (a) (first group excluded: it
      cannot overlap anything).
Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from machine import cpu_model  # bench/machine.py; the script's folder is on sys.path
from mdlm_golf.data import ShardedLoader, load_tokenizer
from mdlm_golf.data.corpus import iter_docs, tokenize_docs
from mdlm_golf.data.shards import write_shard

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def proc_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def make_shards(docs: Path, tokenizer: Path, out: Path, shards: int, shard_tokens: int) -> float:
    """Tokenize the corpus, repeat it as needed, write fineweb_train_*.bin; returns seconds."""
    began = time.perf_counter()
    sp = load_tokenizer(tokenizer)
    corpus = np.concatenate(list(tokenize_docs(sp, list(iter_docs(docs)))))
    pos = 0
    for i in range(shards):
        pieces, need = [], shard_tokens
        while need:
            take = corpus[pos:pos + need]
            pieces.append(take)
            need -= take.size
            pos = (pos + take.size) % corpus.size
        write_shard(out / f"fineweb_train_{i:06d}.bin", np.concatenate(pieces))
    return time.perf_counter() - began


def child_rss(args: argparse.Namespace) -> None:
    """(a)+(c), in a fresh process so the peak belongs to the loader alone."""
    gc.collect()
    try:  # reset VmHWM so import-time peaks do not count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base = proc_status()
    events = []
    loader = ShardedLoader(str(Path(args.dir) / "fineweb_train_*.bin"), args.seq_len, args.layout,
                           1025, 1024, seed=0, shards_per_group=args.shards_per_group,
                           batches_per_group=args.batches_per_group, prefetch=True,
                           on_wait=events.append)
    target_groups = loader.num_groups + max(1, loader.num_groups // 2)  # 1.5 epochs
    step_s = args.sim_step_ms / 1000
    began = time.perf_counter()
    batches = 0
    while loader.stats["groups_served"] < target_groups or loader.cursor:
        loader.next_rows(args.rows)
        time.sleep(step_s)  # the "training step"; the prefetch thread reads meanwhile
        batches += 1
    elapsed = time.perf_counter() - began
    peak = proc_status()
    shards_seen = {name for e in events for name in e["shards"]}
    print(json.dumps({
        "baseline_rss": base["VmRSS"], "hwm": peak["VmHWM"], "rss_end": peak["VmRSS"],
        "buffer_bytes": loader.buffer_bytes, "half_bytes": 2 * loader.half_tokens,
        "groups": len(events), "shards_visited": len(shards_seen), "num_shards": len(loader.paths),
        "batches": batches, "seconds": elapsed, "group_seconds": elapsed / len(events),
        "waits": [e["wait_s"] for e in events], "loads": [e["load_s"] for e in events],
        "prefetched": [e["prefetched"] for e in events]}))
    loader.close()


def throughput(pattern: str, layout: str, seq_len: int, rows: int, seconds: float,
               shards_per_group: int) -> dict:
    waits = []
    loader = ShardedLoader(pattern, seq_len, layout, 1025, 1024, seed=0,
                           shards_per_group=shards_per_group, on_wait=lambda e: waits.append(e["wait_s"]))
    loader.next_rows(rows)  # first group: a load that nothing can overlap
    waits.clear()
    n, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        loader.next_rows(rows)
        n += 1
    elapsed = time.perf_counter() - began
    loader.close()
    tokens = n * rows * seq_len
    return {"batches": n, "tok_s": tokens / elapsed,
            "assembly_tok_s": tokens / max(1e-9, elapsed - sum(waits)),
            "groups": len(waits), "wait_s": sum(waits)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=Path, default=SHARED / "docs_selected.jsonl")
    ap.add_argument("--tokenizer", type=Path, default=SHARED / "tokenizers" / "fineweb_1024_bpe.model")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--shard-tokens", type=int, default=1_000_000)
    ap.add_argument("--shards-per-group", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=3.0, help="per layout, throughput (b)")
    ap.add_argument("--sim-step-ms", type=float, default=5.0, help="simulated training step in (a)")
    ap.add_argument("--batches-per-group", type=int, default=40, help="group budget in (a)")
    ap.add_argument("--layout", default="docs", help="layout for (a)")
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--child-rss", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_rss:
        return child_rss(args)

    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        prep_s = make_shards(args.docs, args.tokenizer, Path(tmp), args.shards, args.shard_tokens)
        cmd = [sys.executable, __file__, "--child-rss", "--dir", tmp]
        for name in ("shards_per_group", "seq_len", "rows", "sim_step_ms", "batches_per_group", "layout"):
            cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(f"RSS child failed:\n{proc.stderr}")
        rss = json.loads(proc.stdout.strip().splitlines()[-1])

        pattern = str(Path(tmp) / "fineweb_train_*.bin")
        tp = {layout: throughput(pattern, layout, args.seq_len, args.rows, args.seconds,
                                 args.shards_per_group) for layout in ("docs", "stream")}

    over = rss["hwm"] - rss["baseline_rss"]
    steady = rss["waits"][1:]
    result = {
        "machine": {"nproc": os.cpu_count(), "cpu": cpu_model(), "numpy": np.__version__,
                    "python": platform.python_version()},
        "setup": {"shards": args.shards, "shard_tokens": args.shard_tokens,
                  "shards_per_group": args.shards_per_group, "seq_len": args.seq_len,
                  "rows": args.rows, "prepare_s": round(prep_s, 2)},
        "rss": {"peak_over_baseline_bytes": over, "buffer_bytes": rss["buffer_bytes"],
                "one_group_bytes": rss["half_bytes"], "ratio_to_buffer": over / rss["buffer_bytes"],
                "overhead_bytes": over - rss["buffer_bytes"], "groups": rss["groups"],
                "shards_visited": rss["shards_visited"], "num_shards": rss["num_shards"],
                "layout": args.layout},
        "throughput_tok_s": {k: round(v["assembly_tok_s"]) for k, v in tp.items()},
        "throughput_incl_waits_tok_s": {k: round(v["tok_s"]) for k, v in tp.items()},
        "wait": {"first_group_s": rss["waits"][0], "later_total_s": sum(steady),
                 "later_max_s": max(steady, default=0.0), "later_groups": len(steady),
                 "group_seconds": rss["group_seconds"], "load_s_mean": float(np.mean(rss["loads"])),
                 "per_group_ms": [round(x * 1e3, 2) for x in rss["waits"]],
                 "per_group_load_ms": [round(x * 1e3, 1) for x in rss["loads"]]},
    }
    mib = 2**20
    r, w = result["rss"], result["wait"]
    print(f"machine: {result['machine']['nproc']} CPUs, {result['machine']['cpu']}, numpy {np.__version__}")
    print(f"data: {args.shards} shards x {args.shard_tokens:,} tokens, {args.shards_per_group} shards/group, "
          f"seq_len {args.seq_len}, {args.rows} rows/batch (prepared in {prep_s:.1f}s)")
    print(f"{'measure':<46} {'value':>16}")
    print(f"{'(a) peak RSS over baseline':<46} {r['peak_over_baseline_bytes'] / mib:>12.2f} MiB")
    print(f"{'    loader buffer (2 halves x one group)':<46} {r['buffer_bytes'] / mib:>12.2f} MiB")
    print(f"{'    peak / buffer':<46} {r['ratio_to_buffer']:>16.3f}")
    print(f"{'    shards visited / total (groups served)':<46} "
          f"{r['shards_visited']:>7} / {r['num_shards']} ({r['groups']})")
    for layout in ("docs", "stream"):
        print(f"{f'(b) next_rows {layout}, tokens/s':<46} {tp[layout]['assembly_tok_s'] / 1e6:>12.1f} M/s"
              f"   (incl. {tp[layout]['groups']} group waits: {tp[layout]['tok_s'] / 1e6:.1f} M/s)")
    print(f"{'(c) wait for later group loads, total / max':<46} "
          f"{w['later_total_s'] * 1e3:>7.2f} / {w['later_max_s'] * 1e3:.2f} ms"
          f"   over {w['later_groups']} groups of {w['group_seconds']:.2f}s (mean load {w['load_s_mean'] * 1e3:.1f} ms;"
          f" first group {w['first_group_s'] * 1e3:.1f} ms)")
    print(f"{'    per group: wait / load ms':<46} "
          + ", ".join(f"{a:g}/{b:g}" for a, b in zip(w["per_group_ms"], w["per_group_load_ms"])))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
