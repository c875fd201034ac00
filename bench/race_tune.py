"""Score a race's finished runs on *tuning* slices: val slices that the race's table does not report.

    python bench/race_tune.py --race runs/race_demo --data demo_run/data [--skip 32] [--num-seqs 64]

The race reports bpb on the first eval_num_seqs val slices; choosing which levers to combine by that
figure would tune on the reported slices. This script evaluates every finished run (model.pt) on the
next --num-seqs slices instead (slice index >= --skip), with the race's ELBO settings and mask seed,
and prints each recipe's bpb per seed and its paired difference to a reference recipe (same seed:
same init, data order and masks). Selections made from this table are honest for the race table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from mdlm_golf.checkpoint import load_model
from mdlm_golf.data import ByteTable, load_split, load_tokenizer
from mdlm_golf.eval import evaluate, headline


def tune_scores(race_dir: Path, data_dir: Path, skip: int, num_seqs: int) -> dict[tuple[str, int], float]:
    """{(recipe, seed): bpb on slices [skip, skip + num_seqs)} for every run with an eval.json."""
    scores = {}
    for run in sorted((race_dir / "runs").iterdir()):
        if not (run / "eval.json").is_file():
            continue
        recipe, seed = run.name.rsplit("_seed=", 1)
        model, cfg, state = load_model(run / "model.pt")
        val = load_split(data_dir, "val", cfg.vocab_size)[skip * cfg.seq_len:]
        table = ByteTable.from_tokenizer(load_tokenizer(Path(state["tokenizer"])), cfg.vocab_size)
        results = evaluate(model, val, table, cfg, steps=cfg.elbo_steps, num_seqs=num_seqs, seed=0,
                           modes=("strict",))
        scores[recipe, int(seed)] = headline(results)["bpb"]
        print(f"{run.name}: {scores[recipe, int(seed)]:.4f} ({headline(results)['kind']})", flush=True)
    return scores


def paired_table(scores: dict[tuple[str, int], float], reference: str) -> str:
    """Markdown: recipe, bpb per seed, mean, and the mean paired difference to the reference."""
    seeds = sorted({s for _, s in scores})
    lines = [f"| recipe | {' | '.join(f'seed {s}' for s in seeds)} | mean | paired diff vs {reference} |",
             "|---|" + "---:|" * (len(seeds) + 2)]
    for recipe in sorted({r for r, _ in scores}):
        values = [scores.get((recipe, s)) for s in seeds]
        diffs = [scores[recipe, s] - scores[reference, s] for s in seeds
                 if (recipe, s) in scores and (reference, s) in scores]
        cells = " | ".join("-" if v is None else f"{v:.4f}" for v in values)
        mean = np.mean([v for v in values if v is not None])
        diff = f"{np.mean(diffs):+.4f} (n={len(diffs)})" if diffs else "-"
        lines.append(f"| {recipe} | {cells} | {mean:.4f} | {diff} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--race", required=True, help="the race's --out folder")
    parser.add_argument("--data", required=True, help="the race's --data folder")
    parser.add_argument("--skip", type=int, default=32, help="val slices the race reports (skipped here)")
    parser.add_argument("--num-seqs", type=int, default=64, help="tuning slices to score")
    parser.add_argument("--reference", default="today", help="recipe the paired differences are taken to")
    parser.add_argument("--json", help="write the scores here")
    args = parser.parse_args()
    scores = tune_scores(Path(args.race), Path(args.data), args.skip, args.num_seqs)
    print(f"\ntuning slices {args.skip}..{args.skip + args.num_seqs - 1} (not the race's reported slices)")
    print(paired_table(scores, args.reference))
    if args.json:
        Path(args.json).write_text(json.dumps({f"{r}_seed={s}": v for (r, s), v in scores.items()}, indent=2))


if __name__ == "__main__":
    main()
