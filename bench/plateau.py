"""How long the early loss plateau lasts, per recipe of a race: each run's validation curve (the race's
--val-every figures in RUN/metrics.jsonl) and the step at which it first reaches a bpb threshold.

    python bench/plateau.py --race runs/plateau600 [--threshold 3.0] [--reference demo] [--json OUT]

A run reaching the threshold between two validation points is credited the linearly interpolated step,
so "steps to 3.0" moves smoothly with the curve; a run that never reaches it shows ">" its last step.
The curves are the race's reported val slices: use this to describe recipes, not to choose among them
(bench/race_tune.py scores tuning slices).
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def val_curve(metrics: Path) -> list[tuple[int, float]]:
    """[(step, val bpb)] of one run, in step order."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if '"val_bpb"' in line]
    return sorted((int(r["step"]), float(r["val_bpb"])) for r in rows)


def steps_to(curve: list[tuple[int, float]], threshold: float) -> float | None:
    """The first step at which the curve reaches threshold (interpolated), None if it never does."""
    for (s0, b0), (s1, b1) in zip([(0, float("inf")), *curve], curve):
        if b1 <= threshold:
            return float(s1) if b0 == float("inf") else s0 + (s1 - s0) * (b0 - threshold) / (b0 - b1)
    return None


def race_curves(race_dir: Path) -> dict[str, dict[int, list[tuple[int, float]]]]:
    """{recipe: {seed: curve}} of every run folder with validation points."""
    curves: dict[str, dict[int, list]] = defaultdict(dict)
    for run in sorted((race_dir / "runs").iterdir()):
        metrics = run / "metrics.jsonl"
        if "_seed=" in run.name and metrics.is_file() and (run / "eval.json").is_file():
            recipe, seed = run.name.rsplit("_seed=", 1)
            curve = val_curve(metrics)
            if curve:
                curves[recipe][int(seed)] = curve
    return curves


def table(curves: dict, threshold: float, reference: str) -> tuple[list[str], list[dict]]:
    """Markdown lines (mean val bpb at each common step, steps to the threshold per seed and their mean
    difference to the reference recipe, paired by seed) and the JSON rows."""
    steps = sorted(set.intersection(*(set(s for s, _ in c) for runs in curves.values() for c in runs.values())))
    ref = {seed: steps_to(c, threshold) for seed, c in curves.get(reference, {}).items()}
    head = ["recipe", "seeds", *[f"step {s}" for s in steps], f"steps to {threshold} (per seed)",
            f"vs {reference} (paired mean)"]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * (len(steps) + 2)]
    rows = []
    for recipe, runs in sorted(curves.items()):
        means = [statistics.mean(dict(c)[s] for c in runs.values()) for s in steps]
        reach = {seed: steps_to(c, threshold) for seed, c in sorted(runs.items())}
        diffs = [reach[s] - ref[s] for s in reach if reach[s] is not None and ref.get(s) is not None]
        shown = ", ".join(f"{v:.0f}" if v is not None else f">{runs[s][-1][0]}" for s, v in reach.items())
        paired = f"{statistics.mean(diffs):+.0f} (n={len(diffs)})" if diffs else "-"
        lines.append(f"| {recipe} | {len(runs)} | " + " | ".join(f"{m:.3f}" for m in means)
                     + f" | {shown} | {paired} |")
        rows.append({"recipe": recipe, "seeds": sorted(runs), "steps": steps, "mean_val_bpb": means,
                     "steps_to_threshold": reach, "paired_vs_reference": statistics.mean(diffs) if diffs else None})
    return lines, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--race", required=True, type=Path, help="the race's --out folder")
    parser.add_argument("--threshold", type=float, default=3.0, help="val bpb that ends the plateau")
    parser.add_argument("--reference", default="demo", help="recipe the steps-to-threshold are paired with")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    curves = race_curves(args.race)
    if not curves:
        raise SystemExit(f"{args.race}: no finished runs with validation points")
    lines, rows = table(curves, args.threshold, args.reference)
    print(f"{args.race}: mean val bpb over seeds (the race's reported slices) and steps to {args.threshold}")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
