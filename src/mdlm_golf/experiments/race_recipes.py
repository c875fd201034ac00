"""The race: several recipes, AR included, trained on the same data at equal tokens, FLOPs or seconds,
scored side by side.

Every recipe is a set of config overrides on one base config (same shape unless a recipe changes it, same
data order for a seed). The budget every run gets (`equal`):
  tokens   base.steps steps for every recipe (the same batch: the same tokens)
  flops    the steps whose training FLOPs (the model's formula per token: block diffusion's 2L positions,
           the decoder's layers) match what the yardstick (else the base config) spends in base.steps
           steps; the warmdown
           shrinks with the steps, so every schedule keeps its shape
  seconds  the yardstick trains first; every other run gets its training seconds (per seed) as
           max_wallclock, the schedule following the clock (meaningful on a quiet machine only)
Runs are trained and scored with the ablate machinery (OUT/runs/NAME[_flops|_Ns]_seed=S, finished runs
reused: a recipe whose FLOPs budget is base.steps shares its equal-tokens run), with `val_every`
figures in each run's metrics.jsonl. The report: a table (recipe, parameters, steps, tokens, FLOPs,
seconds, bpb with its kind, gap to the yardstick) in OUT/race.{json,md}, and OUT/race.png with bpb
against tokens, FLOPs and seconds.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .ablation import EVAL_SEED, Run, check_reusable, run_record, train_and_score
from ..config import BEST_RECIPE, EARLY_RECIPE, Config, field_types, parse_value
from ..data import ByteTable, load_split, load_tokenizer
from ..files import write_png, write_text_atomic
from ..model import Transformer

# The standard field: today's recipe, the AR yardsticks, each lever alone on top of today's recipe, and
# the levers that helped combined. Each names every recipe field, so presets that carry a recipe (demo,
# record) change only the shape, never what "today" or a lever means.
TODAY = {"objective": "mdlm", "optimizer": "adamw", "time_cond": "true", "ema": "0.0", "anchor_mask_prob": "0.0",
         "block_size": "0", "time_sampling": "antithetic", "decoder_layers": "0", "decoder_tied": "false",
         "loss_weight": "elbo", "loss_warmup_steps": "0", "time_warmup_steps": "0",
         "time_warmup_start": "1.0", "subtokens": "1"}
BEST = {k: str(v) for k, v in BEST_RECIPE.items()}
EARLY = {k: str(v) for k, v in EARLY_RECIPE.items()}
LEVERS: dict[str, dict[str, str]] = {
    "ar": {"objective": "ar"},
    # the strongest AR we train: every lever that helps AR (Muon; BENCHMARKS.md, the yardstick)
    "ar-best": {"objective": "ar", "optimizer": "muon"},
    "muon": {"optimizer": "muon"},
    "no-time-cond": {"time_cond": "false"},
    "ema": {"ema": "0.99"},
    "anchor": {"anchor_mask_prob": "1.0"},
    "stratified": {"time_sampling": "stratified"},
    # the levers that helped alone on tuning slices (bench/race_tune.py; BENCHMARKS.md), combined
    "best": BEST,
    # ... with the early-training levers that shortened the plateau (issue 22): the flat loss weight alone,
    # and with the time warmup (what the demo and record presets train)
    "best-flat": {**BEST, "loss_weight": "flat"},
    "best-early": {**BEST, **EARLY},
    # block diffusion on top of the best recipe (issue 14): blocks of 2, 4, 16, 64 tokens
    **{f"block{b}": {**BEST, "block_size": str(b)} for b in (2, 4, 16, 64)},
    # ... as an encoder of the clean blocks and a K-layer decoder of the noisy ones (E2D2; issue 21)
    **{f"block{b}-dec{k}": {**BEST, "block_size": str(b), "decoder_layers": str(k)} for b, k in
       ((2, 1), (2, 2), (4, 1))},
    **{f"block{b}-dec{k}-tied": {**BEST, "block_size": str(b), "decoder_layers": str(k), "decoder_tied": "true"}
       for b, k in ((2, 1), (2, 2))},
}
RECIPES: dict[str, dict[str, str]] = {"today": TODAY, **{name: {**TODAY, **lever} for name, lever in LEVERS.items()}}
YARDSTICK = "ar-best"  # the gap column's reference, and what equal FLOPs and seconds are measured by
EQUALS = ("tokens", "flops", "seconds")
SECONDS_STEPS_FACTOR = 8  # an equal-seconds run's step cap, x base.steps: the clock ends it first


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


def recipe_configs(base: Config, recipes: dict[str, dict[str, str]]) -> dict[str, Config]:
    """Each recipe's config on the base (validated before anything trains)."""
    configs, known = {}, field_types()
    for name, overrides in recipes.items():
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise ValueError(f"recipe {name!r}: unknown config field {unknown[0]!r}; the fields are "
                             f"{', '.join(known)}")
        try:
            configs[name] = dataclasses.replace(base, **{k: parse_value(k, v) for k, v in overrides.items()})
        except (TypeError, ValueError) as e:
            raise ValueError(f"recipe {name!r}: {e}") from None
    return configs


def flops_per_token(cfg: Config) -> int:
    """The training FLOPs per token of a config's model (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        return Transformer(cfg).flops_per_token()


def budget(cfg: Config, base: Config, yardstick: Config, equal: str, seconds: float | None) -> tuple[Config, str]:
    """The config of one run under the race's budget, and the suffix naming that budget in its folder."""
    if equal == "flops":
        steps = max(1, base.steps * flops_per_token(yardstick) // flops_per_token(cfg))
        if steps == base.steps:
            return cfg, ""  # the equal-tokens run itself
        warmdown = round(cfg.warmdown_steps * steps / base.steps)
        return dataclasses.replace(cfg, steps=steps, warmdown_steps=warmdown), "_flops"
    if equal == "seconds" and seconds is not None:
        return dataclasses.replace(cfg, steps=base.steps * SECONDS_STEPS_FACTOR, max_wallclock=seconds), \
            f"_{seconds:.0f}s"
    return cfg, ""


def plan_race(base: Config, recipes: dict[str, dict[str, str]], seeds: list[int], out_dir: Path,
              equal: str = "tokens", yardstick_seconds: dict[int, float] | None = None) -> list[Run]:
    """One Run per (recipe, seed), configs built and validated before anything trains. Equal seconds
    needs yardstick_seconds {seed: training seconds}; the yardstick's own runs come first."""
    if not recipes or not seeds:
        raise ValueError("race needs at least one recipe and one seed")
    if equal not in EQUALS:
        raise ValueError(f"equal must be one of {EQUALS}, got {equal!r}")
    configs = recipe_configs(base, recipes)
    yardstick = configs.get(YARDSTICK, base)
    runs = []
    for name in sorted(configs, key=lambda n: n != YARDSTICK):  # the yardstick first: seconds are its
        for seed in seeds:
            cfg = dataclasses.replace(configs[name], seed=int(seed))
            seconds = None if name == YARDSTICK else (yardstick_seconds or {}).get(int(seed))
            cfg, suffix = budget(cfg, base, yardstick, equal, seconds)
            runs.append(Run(name, int(seed), cfg, Path(out_dir) / "runs" / f"{name}{suffix}_seed={seed}"))
    return runs


def race(base: Config, recipes: dict[str, dict[str, str]], seeds: list[int], data_dir: Path, out_dir: Path,
         tokenizer_path: Path, echo: Callable[[str], None] = print, equal: str = "tokens") -> dict:
    """Train and score every (recipe, seed) at equal tokens, FLOPs or seconds; writes OUT/race.json,
    race.md and race.png."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if equal == "seconds" and YARDSTICK not in recipes:
        raise ValueError(f"equal seconds are the yardstick's: add the recipe {YARDSTICK!r}")
    runs = plan_race(base, recipes, seeds, out_dir, equal)
    val = load_split(data_dir, "val", base.vocab_size)
    table = ByteTable.from_tokenizer(load_tokenizer(tokenizer_path), base.vocab_size)
    echo(f"race at equal {equal}: {len(recipes)} recipes x seeds {list(seeds)} = {len(runs)} runs, "
         f"{base.steps} steps x {base.tokens_per_step:,} tokens for the yardstick {YARDSTICK}, in {out_dir / 'runs'}")
    began, records = time.perf_counter(), []
    for i, run in enumerate(runs, 1):
        if equal == "seconds" and run.value != YARDSTICK:  # its budget, the yardstick's seconds, is known now
            seconds = {r["seed"]: r["train_seconds"] for r in records if r["value"] == YARDSTICK}
            run = plan_race(base, {run.value: recipes[run.value]}, [run.seed], out_dir, equal, seconds)[0]
        records.append(race_one(run, i, len(runs), data_dir, tokenizer_path, val, table, out_dir, echo))
    result = {"recipes": recipes, "seeds": list(seeds), "base_config": base.to_dict(), "equal": equal,
              "yardstick": YARDSTICK,
              "eval": {"elbo_steps": base.elbo_steps, "eval_num_seqs": base.eval_num_seqs, "seed": EVAL_SEED},
              "runs": records, "wall_seconds_this_call": time.perf_counter() - began}
    result["summary"] = summarize(result)
    write_text_atomic(out_dir / "race.json", json.dumps(result, indent=2) + "\n")
    write_text_atomic(out_dir / "race.md", markdown_table(result))
    plot(result, out_dir / "race.png")
    echo(markdown_table(result))
    echo(f"wrote {out_dir / 'race.json'}, {out_dir / 'race.md'}, {out_dir / 'race.png'}")
    return result


def race_one(run: Run, index: int, total: int, data_dir: Path, tokenizer_path: Path, val: np.ndarray,
             table: ByteTable, out_dir: Path, echo: Callable[[str], None]) -> dict:
    """Train and score one run (or reuse it, finished) and return its record with its budget and curve."""
    done = check_reusable(run)
    head = f"run {index}/{total}: {run.value} seed={run.seed}"
    if not done:
        echo(f"{head} ... training {run.cfg.steps} steps"
             + (f" or {run.cfg.max_wallclock:.0f}s" if run.cfg.max_wallclock else "")
             + f" (log: {run.run_dir / 'train.log'})")
        train_and_score(run, data_dir, tokenizer_path, val, table, EVAL_SEED)
    r = run_record(run, out_dir)
    per_token = flops_per_token(run.cfg)
    r["flops"] = r["tokens"] * per_token
    r["curve"] = val_curve(run.run_dir / "metrics.jsonl", per_token)
    echo(f"{head}: bpb {r['strict_bpb']:.4f} ({r['kind']}) | {r['num_params']:,} params | {r['steps']} steps | "
         f"{r['tokens']:,} tokens | {r['flops']:.3g} FLOPs | train {r['train_seconds']:.0f}s"
         + (" (reused)" if done else ""))
    return r


def val_curve(metrics_path: Path, flops_per_token: int) -> list[dict]:
    """The run's periodic val figures: [{step, tokens, flops, elapsed_s, bpb}] (FLOPs from the tokens for
    runs logged before metrics.jsonl carried them)."""
    try:
        records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        records = [r for r in records if isinstance(r, dict)]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{metrics_path}: not JSON lines ({e})") from None
    try:
        return [{"step": r["step"], "tokens": r["tokens"], "flops": r.get("flops", r["tokens"] * flops_per_token),
                 "elapsed_s": r["elapsed_s"], "bpb": r["val_bpb"]} for r in records if "val_bpb" in r]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{metrics_path}: a val record lacks a field ({e!r})") from None


def mean_spread(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def summarize(result: dict) -> list[dict]:
    """Per recipe: mean/std of bpb over seeds, parameters, steps, tokens, FLOPs, train seconds, and the gap
    to the yardstick."""
    rows = []
    for name in result["recipes"]:
        runs = [r for r in result["runs"] if r["value"] == name]
        bpb, spread = mean_spread([r["strict_bpb"] for r in runs])
        mean = {key: float(np.mean([r[key] for r in runs])) for key in ("steps", "tokens", "flops", "train_seconds")}
        rows.append({"recipe": name, "runs": len(runs), "bpb_mean": bpb, "bpb_std": spread,
                     "kind": runs[0]["kind"], "num_params": runs[0]["num_params"], **mean,
                     "overrides": result["recipes"][name]})
    yardstick = next((r["bpb_mean"] for r in rows if r["recipe"] == result["yardstick"]), None)
    for row in rows:
        row["gap"] = None if yardstick is None else row["bpb_mean"] - yardstick
    return rows


def markdown_table(result: dict) -> str:
    cfg, ev = result["base_config"], result["eval"]
    lines = [f"Base: {cfg['num_layers']} layers x {cfg['model_dim']}, seq {cfg['seq_len']}, "
             f"{cfg['batch_rows'] * cfg['grad_accum']} rows x {cfg['steps']} steps, lr {cfg['lr']:g}, "
             f"layout {cfg['layout']}; seeds {', '.join(map(str, result['seeds']))}; equal {result['equal']} "
             f"(the yardstick {result['yardstick']}'s). MDLM figures: {ev['elbo_steps']}-step ELBO on "
             f"{ev['eval_num_seqs']} val slices (mask seed {ev['seed']}), or the exact code length where "
             f"smaller; AR: exact chain rule on {ev['eval_num_seqs']} windows. Steps, tokens, FLOPs and "
             f"seconds: means over seeds.",
             "",
             f"| recipe | overrides | params | steps | tokens | train FLOPs | train s | bpb (mean ± std) | kind | "
             f"gap to {result['yardstick']} |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in result["summary"]:
        std = "" if r["bpb_std"] is None else f" ± {r['bpb_std']:.4f}"
        gap = "-" if r["gap"] is None else f"{r['gap']:+.4f}"
        changed = {k: v for k, v in r["overrides"].items() if TODAY.get(k) != v}  # today's fields go unsaid
        overrides = ", ".join(f"{k}={v}" for k, v in changed.items()) or "-"
        lines.append(f"| {r['recipe']} | {overrides} | {r['num_params']:,} | {r['steps']:.0f} | {r['tokens']:,.0f} | "
                     f"{r['flops']:.3g} | {r['train_seconds']:.0f} | {r['bpb_mean']:.4f}{std} | {r['kind']} | {gap} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """bpb against training tokens, FLOPs and seconds: each seed a line, per recipe a colour."""
    import matplotlib  # imported here: a heavy import only the figure needs

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_keys = (("tokens", "training tokens"), ("flops", "training FLOPs (the model's formula)"),
                 ("elapsed_s", "training seconds (this machine)"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    try:
        for i, name in enumerate(result["recipes"]):
            colour = f"C{i % 10}"
            for j, run in enumerate(r for r in result["runs"] if r["value"] == name):
                curve = run["curve"] or [{"tokens": run["tokens"], "flops": run["flops"],
                                          "elapsed_s": run["train_seconds"], "bpb": run["strict_bpb"]}]
                for ax, (key, _) in zip(axes, axes_keys):
                    ax.plot([c[key] for c in curve], [c["bpb"] for c in curve], color=colour, marker=".",
                            lw=1.2, label=name if j == 0 else None)
        axes[0].set_ylabel("val bpb (MDLM: strict bound or exact; AR: exact)")
        for ax, (_, label) in zip(axes, axes_keys):
            ax.set_xlabel(label)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"race at equal {result['equal']}", fontsize=10)
        write_png(fig, path, dpi=110)
    finally:
        plt.close(fig)
