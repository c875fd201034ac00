"""The race: several recipes, AR included, trained on the same data at equal tokens, scored side by side.

Every recipe is a set of config overrides on one base config (same shape unless a recipe changes it,
same steps x batch = same tokens, same data order for a seed). Runs are trained and scored with the
ablate machinery (OUT/runs/{recipe}_seed={seed}, finished runs reused), with `val_every` figures in
each run's metrics.jsonl. The report: a table (recipe, parameters, tokens, seconds, bpb with its kind,
gap to AR) in OUT/race.{json,md}, and OUT/race.png with bpb against tokens and against seconds.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .ablation import EVAL_SEED, Run, check_reusable, run_record, train_and_score
from ..config import BEST_RECIPE, Config, parse_value
from ..data import ByteTable, load_split, load_tokenizer
from ..files import atomic_path, write_text_atomic

# The standard field: today's recipe, the AR yardstick, each lever alone on top of today's recipe, and
# the levers that helped combined. Each names every recipe field, so presets that carry a recipe (demo,
# record) change only the shape, never what "today" or a lever means.
TODAY = {"objective": "mdlm", "optimizer": "adamw", "time_cond": "true", "ema": "0.0", "anchor_mask_prob": "0.0",
         "block_size": "0", "time_sampling": "antithetic"}
BEST = {k: str(v) for k, v in BEST_RECIPE.items()}
LEVERS: dict[str, dict[str, str]] = {
    "ar": {"objective": "ar"},
    "muon": {"optimizer": "muon"},
    "no-time-cond": {"time_cond": "false"},
    "ema": {"ema": "0.99"},
    "anchor": {"anchor_mask_prob": "1.0"},
    "stratified": {"time_sampling": "stratified"},
    # the levers that helped alone on tuning slices (bench/race_tune.py; BENCHMARKS.md), combined
    "best": BEST,
    # block diffusion on top of the best recipe (issue 14): blocks of 2, 4, 16, 64 tokens
    **{f"block{b}": {**BEST, "block_size": str(b)} for b in (2, 4, 16, 64)},
}
RECIPES: dict[str, dict[str, str]] = {"today": TODAY, **{name: {**TODAY, **lever} for name, lever in LEVERS.items()}}
YARDSTICK = "ar"


def parse_recipe(text: str) -> tuple[str, dict[str, str]]:
    """'NAME' (a built-in recipe), 'NAME:field=value,field=value' (a new one) or 'NAME:' (the base as is)."""
    name, colon, body = text.partition(":")
    if colon and not body.strip():
        return name, {}
    if not body:
        if name not in RECIPES:
            raise ValueError(f"unknown recipe {name!r}; built-in: {', '.join(RECIPES)}, or NAME:field=value,...")
        return name, RECIPES[name]
    pairs = [item.split("=", 1) for item in body.split(",")]
    if any(len(p) != 2 for p in pairs):
        raise ValueError(f"recipe {text!r}: write NAME:field=value,field=value")
    return name, {k.strip().replace("-", "_"): v.strip() for k, v in pairs}


def plan_race(base: Config, recipes: dict[str, dict[str, str]], seeds: list[int], out_dir: Path) -> list[Run]:
    """One Run per (recipe, seed), configs built and validated before anything trains."""
    if not recipes or not seeds:
        raise ValueError("race needs at least one recipe and one seed")
    runs = []
    for name, overrides in recipes.items():
        try:
            values = {k: parse_value(k, v) for k, v in overrides.items()}
            for seed in seeds:
                cfg = dataclasses.replace(base, **values, seed=int(seed))
                runs.append(Run(name, int(seed), cfg, Path(out_dir) / "runs" / f"{name}_seed={seed}"))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"recipe {name!r}: {e}") from None
    return runs


def race(base: Config, recipes: dict[str, dict[str, str]], seeds: list[int], data_dir: Path, out_dir: Path,
         tokenizer_path: Path, echo: Callable[[str], None] = print) -> dict:
    """Train and score every (recipe, seed); writes OUT/race.json, race.md and race.png."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    runs = plan_race(base, recipes, seeds, out_dir)
    val = load_split(data_dir, "val", base.vocab_size)
    table = ByteTable.from_tokenizer(load_tokenizer(tokenizer_path), base.vocab_size)
    reused = [check_reusable(r) for r in runs]
    echo(f"race: {len(recipes)} recipes x seeds {list(seeds)} = {len(runs)} runs ({sum(reused)} already done), "
         f"{base.steps} steps x {base.tokens_per_step:,} tokens each, in {out_dir / 'runs'}")
    began, records = time.perf_counter(), []
    for i, (run, done) in enumerate(zip(runs, reused), 1):
        head = f"run {i}/{len(runs)}: {run.value} seed={run.seed}"
        if not done:
            echo(f"{head} ... training (log: {run.run_dir / 'train.log'})")
            train_and_score(run, data_dir, tokenizer_path, val, table, EVAL_SEED)
        r = run_record(run, out_dir)
        r["curve"] = val_curve(run.run_dir / "metrics.jsonl")
        records.append(r)
        echo(f"{head}: bpb {r['strict_bpb']:.4f} ({r['kind']}) | {r['num_params']:,} params | "
             f"{r['tokens']:,} tokens | train {r['train_seconds']:.0f}s" + (" (reused)" if done else ""))
    result = {"recipes": recipes, "seeds": list(seeds), "base_config": base.to_dict(),
              "eval": {"elbo_steps": base.elbo_steps, "eval_num_seqs": base.eval_num_seqs, "seed": EVAL_SEED},
              "runs": records, "wall_seconds_this_call": time.perf_counter() - began}
    result["summary"] = summarize(result)
    write_text_atomic(out_dir / "race.json", json.dumps(result, indent=2) + "\n")
    write_text_atomic(out_dir / "race.md", markdown_table(result))
    plot(result, out_dir / "race.png")
    echo(markdown_table(result))
    echo(f"wrote {out_dir / 'race.json'}, {out_dir / 'race.md'}, {out_dir / 'race.png'}")
    return result


def val_curve(metrics_path: Path) -> list[dict]:
    """The run's periodic val figures: [{step, tokens, elapsed_s, bpb}]."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return [{"step": r["step"], "tokens": r["tokens"], "elapsed_s": r["elapsed_s"], "bpb": r["val_bpb"]}
            for r in records if "val_bpb" in r]


def mean_spread(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def summarize(result: dict) -> list[dict]:
    """Per recipe: mean/std of bpb over seeds, parameters, tokens, train seconds, and the gap to AR."""
    rows = []
    for name in result["recipes"]:
        runs = [r for r in result["runs"] if r["value"] == name]
        bpb, spread = mean_spread([r["strict_bpb"] for r in runs])
        rows.append({"recipe": name, "runs": len(runs), "bpb_mean": bpb, "bpb_std": spread,
                     "kind": runs[0]["kind"], "num_params": runs[0]["num_params"], "tokens": runs[0]["tokens"],
                     "train_seconds": float(np.mean([r["train_seconds"] for r in runs])),
                     "overrides": result["recipes"][name]})
    ar = next((r["bpb_mean"] for r in rows if r["recipe"] == YARDSTICK), None)
    for row in rows:
        row["gap_to_ar"] = None if ar is None else row["bpb_mean"] - ar
    return rows


def markdown_table(result: dict) -> str:
    cfg, ev = result["base_config"], result["eval"]
    lines = [f"Base: {cfg['num_layers']} layers x {cfg['model_dim']}, seq {cfg['seq_len']}, "
             f"{cfg['batch_rows'] * cfg['grad_accum']} rows x {cfg['steps']} steps, lr {cfg['lr']:g}, "
             f"layout {cfg['layout']}; seeds {', '.join(map(str, result['seeds']))}. MDLM figures: "
             f"{ev['elbo_steps']}-step ELBO on {ev['eval_num_seqs']} val slices (mask seed {ev['seed']}); "
             f"AR: exact chain rule on {ev['eval_num_seqs']} windows.",
             "",
             "| recipe | overrides | params | tokens | train s | bpb (mean ± std) | kind | gap to AR |",
             "|---|---|---:|---:|---:|---:|---|---:|"]
    for r in result["summary"]:
        std = "" if r["bpb_std"] is None else f" ± {r['bpb_std']:.4f}"
        gap = "-" if r["gap_to_ar"] is None else f"{r['gap_to_ar']:+.4f}"
        changed = {k: v for k, v in r["overrides"].items() if TODAY.get(k) != v}  # today's fields go unsaid
        overrides = ", ".join(f"{k}={v}" for k, v in changed.items()) or "-"
        lines.append(f"| {r['recipe']} | {overrides} | {r['num_params']:,} | {r['tokens']:,} | "
                     f"{r['train_seconds']:.0f} | {r['bpb_mean']:.4f}{std} | {r['kind']} | {gap} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """bpb against training tokens and against training seconds: each seed a line, per recipe a colour."""
    import matplotlib  # imported here: a heavy import only the figure needs

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    try:
        for i, name in enumerate(result["recipes"]):
            colour = f"C{i % 10}"
            for j, run in enumerate(r for r in result["runs"] if r["value"] == name):
                curve = run["curve"] or [{"tokens": run["tokens"], "elapsed_s": run["train_seconds"],
                                          "bpb": run["strict_bpb"]}]
                for ax, key in zip(axes, ("tokens", "elapsed_s")):
                    ax.plot([c[key] for c in curve], [c["bpb"] for c in curve], color=colour, marker=".",
                            lw=1.2, label=name if j == 0 else None)
        axes[0].set(xlabel="training tokens", ylabel="val bpb (MDLM: strict ELBO bound; AR: exact)")
        axes[1].set(xlabel="training seconds (this machine)")
        for ax in axes:
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle("race at equal tokens", fontsize=10)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)
