"""Ablations: one run per (value, seed) of one config field, scored with one fixed ELBO, tabled and plotted.

Every run is trained without evaluation, then its saved model.pt is reloaded and scored (strict and
anchored bpb) with the base config's elbo_steps and eval_num_seqs and the SAME mask seed for every
run, so differences between values are the models', not mask noise. Runs live in
OUT/runs/{param}={value}_seed={seed}; a run whose eval.json exists is reused, so rerunning the same
command resumes an interrupted ablation. Single process (not under torchrun).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..checkpoint import load_model, run_checkpoint
from ..config import Config, field_types, parse_value, with_defaults
from ..data import ByteTable, load_split, load_tokenizer
from ..eval import evaluate, headline
from ..files import read_json_object, write_png, write_text_atomic
from ..dist import pick_device
from ..train import CHECKPOINT_NAME, RunInterrupted, train

EVAL_SEED = 0  # mask seed of every run's evaluation (the `mdlm-golf eval` default)
SUMMARY_NAME = "train_summary.json"  # written before eval.json: eval.json marks a finished run


@dataclasses.dataclass(frozen=True)
class Run:
    value: Any
    seed: int
    cfg: Config
    run_dir: Path


def numeric_field(param: str) -> type:
    """The field's type; a one-line error when it is not a numeric Config field."""
    kinds = field_types()
    if param not in kinds:
        raise ValueError(f"unknown config field {param!r}")
    if param == "seed":
        raise ValueError("cannot ablate seed: it is the replicate axis, set with seeds (--seeds)")
    if kinds[param] not in (int, float):
        raise ValueError(f"{param} is a {kinds[param].__name__} field; ablate needs a numeric one (int or float)")
    return kinds[param]


def plan_runs(base: Config, param: str, values: list, seeds: list[int], out_dir: Path) -> list[Run]:
    """Every (value, seed) run with its Config built and validated up front (nothing trains yet)."""
    numeric_field(param)
    parsed = [parse_value(param, str(v)) for v in values]
    if not parsed or not seeds:
        raise ValueError("ablate needs at least one value and one seed")
    for name, items in (("values", parsed), ("seeds", seeds)):
        if len(set(items)) != len(items):
            raise ValueError(f"{name} repeat: {items}")
    runs = []
    for value in parsed:
        for seed in seeds:
            try:
                cfg = dataclasses.replace(base, **{param: value, "seed": int(seed)})
                cfg.for_world(1)
            except ValueError as e:
                raise ValueError(f"{param}={value}: {e}") from None
            runs.append(Run(value, int(seed), cfg, Path(out_dir) / "runs" / f"{param}={value}_seed={seed}"))
    return runs


def check_reusable(run: Run) -> bool:
    """True when the run finished before with this very config; an error when it was made with another."""
    if not ((run.run_dir / "eval.json").is_file() and (run.run_dir / SUMMARY_NAME).is_file()):
        return False
    check_same_config(run, run.run_dir / "config.json", "finished")
    return True


def check_same_config(run: Run, path: Path, state: str) -> None:
    """ValueError naming the folder unless the run's saved config (path) is the one planned now."""
    saved = with_defaults(read_json_object(path, ValueError) or {})
    changed = {k: (saved.get(k), v) for k, v in run.cfg.for_world(1).to_dict().items() if saved.get(k) != v}
    if changed:
        diffs = ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in sorted(changed.items()))
        raise ValueError(f"{run.run_dir}: {state} with another config ({diffs}); use a fresh out folder")


def train_and_score(run: Run, data_dir: Path, tokenizer_path: Path, val: np.ndarray,
                    byte_table: ByteTable, eval_seed: int) -> None:
    """Train quietly (the log goes to RUN/train.log only), then score the reloaded model.pt. A run a signal
    stopped before resumes from its checkpoint; a signal now leaves a checkpoint and raises RunInterrupted
    (no summary or eval is written for a run without a model)."""
    resume = (run.run_dir / CHECKPOINT_NAME).is_file()
    if resume:
        check_same_config(run, run.run_dir / "config.json", "stopped")
    stale = [SUMMARY_NAME, "eval.json", *([] if resume else ["train.log", "metrics.jsonl"])]
    for name in stale:  # of an interrupted try (a resumed run keeps its log, cut back to its checkpoint)
        (run.run_dir / name).unlink(missing_ok=True)
    # RunLog prints through tqdm.write, not echo, when stderr is a terminal: swallow stdout too
    with contextlib.redirect_stdout(io.StringIO()):
        summary = train(run.cfg, data_dir, run.run_dir, tokenizer_path, run_eval=False, resume=resume,
                        echo=lambda s: None)
    if summary["interrupted"]:
        raise RunInterrupted(summary["interrupted"], run.run_dir)
    write_text_atomic(run.run_dir / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
    model, cfg, _ = load_model(run_checkpoint(run.run_dir), pick_device())
    results = evaluate(model, val, byte_table, cfg, steps=cfg.elbo_steps, num_seqs=cfg.eval_num_seqs,
                       seed=eval_seed)
    write_text_atomic(run.run_dir / "eval.json", json.dumps(results, indent=2) + "\n")


def run_record(run: Run, out_dir: Path) -> dict:
    """One run's row of ablation.json, read back from its folder."""
    summary = read_json_object(run.run_dir / SUMMARY_NAME, ValueError) or {}
    results = read_json_object(run.run_dir / "eval.json", ValueError) or {}
    try:
        main = headline(results)  # an AR run has one exact figure: it stands in both columns
        return {"value": run.value, "seed": run.seed, "strict_bpb": main["bpb"], "kind": main["kind"],
                "anchored_bpb": results.get("anchored", main)["bpb"], "tokens": summary["tokens"],
                "final_loss": summary["losses"][-1] if summary["losses"] else None,
                "steps": summary["steps"], "num_params": summary["num_params"],
                "train_seconds": summary["train_seconds"], "eval_seconds": main["eval_seconds"],
                "run_dir": str(run.run_dir.relative_to(out_dir))}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{run.run_dir}: its {SUMMARY_NAME} or eval.json lacks a field ({e!r}); "
                         f"delete them to train the run again") from None


def ablate(base: Config, param: str, values: list, seeds: list[int], data_dir: Path, out_dir: Path,
           tokenizer_path: Path, echo: Callable[[str], None] = print, *, eval_seed: int = EVAL_SEED) -> dict:
    """Train and score one run per (value, seed) with everything else fixed; writes OUT/ablation.{json,md,png}."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    runs = plan_runs(base, param, values, seeds, out_dir)
    tables = {}  # per vocab size (an ablated vocab_size needs its own), loaded before any training
    for vocab in sorted({r.cfg.vocab_size for r in runs}):
        tables[vocab] = (load_split(data_dir, "val", vocab),
                         ByteTable.from_tokenizer(load_tokenizer(tokenizer_path), vocab))
    reused = [check_reusable(r) for r in runs]
    echo(f"ablate {param} over {[r.value for r in runs[::len(seeds)]]} x seeds {list(seeds)}: "
         f"{len(runs)} runs ({sum(reused)} already done) in {out_dir / 'runs'}; strict ELBO "
         f"{base.elbo_steps} steps, {base.eval_num_seqs} slices, mask seed {eval_seed} for every run")
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=len(runs), desc="ablate", unit="run", dynamic_ncols=True)
    say = bar.write if bar else echo
    began, records = time.perf_counter(), []
    try:
        for i, (run, done) in enumerate(zip(runs, reused), 1):
            head = f"run {i}/{len(runs)}: {param}={run.value} seed={run.seed}"
            if not done:
                say(f"{head} ... training {run.cfg.steps} steps (log: {run.run_dir / 'train.log'})")
                train_and_score(run, data_dir, tokenizer_path, *tables[run.cfg.vocab_size], eval_seed)
            r = run_record(run, out_dir)
            records.append(r)
            loss = float("nan") if r["final_loss"] is None else r["final_loss"]
            say(f"{head}: strict bpb {r['strict_bpb']:.4f} | anchored bpb {r['anchored_bpb']:.4f} | "
                f"loss {loss:.4f} | {r['num_params']:,} params | "
                + ("reused" if done else f"train {r['train_seconds']:.1f}s, eval {r['eval_seconds']:.1f}s"))
            if bar:
                bar.update(1)
    finally:
        if bar:
            bar.close()
    result = {"param": param, "values": [r.value for r in runs[::len(seeds)]], "seeds": list(seeds),
              "eval": {"elbo_steps": base.elbo_steps, "eval_num_seqs": base.eval_num_seqs, "seed": eval_seed},
              "base_config": base.to_dict(), "runs": records,
              "wall_seconds_this_call": time.perf_counter() - began}
    result["summary"] = summarize(result)
    result["conclusion"] = conclusion(result)
    write_report(result, out_dir)
    echo(result["conclusion"])
    echo(f"wrote {out_dir / 'ablation.json'}, {out_dir / 'ablation.md'}, {out_dir / 'ablation.png'}")
    return result


def summarize(result: dict) -> list[dict]:
    """Per value: mean, std (ddof 1; None for one seed), min and max of strict bpb over seeds."""
    rows = []
    for value in result["values"]:
        runs = [r for r in result["runs"] if r["value"] == value]
        strict = np.array([r["strict_bpb"] for r in runs])
        rows.append({"value": value, "runs": len(runs), "strict_mean": float(strict.mean()),
                     "strict_std": float(strict.std(ddof=1)) if len(runs) > 1 else None,
                     "strict_min": float(strict.min()), "strict_max": float(strict.max()),
                     "anchored_mean": float(np.mean([r["anchored_bpb"] for r in runs])),
                     "num_params": sorted({r["num_params"] for r in runs})})
    return rows


def seed_noise(result: dict) -> tuple[float | None, float | None, int]:
    """(pooled within-value std over seeds, residual std once each seed's shared offset is removed,
    seeds per value); None where there is too little data to estimate it.

    Runs of one seed share init (same shapes), batches and masks across values, so the second
    figure (the residual of an additive value + seed fit) is the noise of a within-seed comparison.
    """
    values, seeds = result["values"], result["seeds"]
    bpb = {(r["value"], r["seed"]): r["strict_bpb"] for r in result["runs"]}
    n = min(sum((v, s) in bpb for s in seeds) for v in values)
    if n < 2:
        return None, None, n
    per_value = [[bpb[v, s] for s in seeds if (v, s) in bpb] for v in values]
    within = math.sqrt(float(np.mean([np.var(b, ddof=1) for b in per_value])))
    if len(values) < 2 or any((v, s) not in bpb for v in values for s in seeds):
        return within, None, n
    grid = np.array([[bpb[v, s] for s in seeds] for v in values])
    resid = grid - grid.mean(1, keepdims=True) - grid.mean(0, keepdims=True) + grid.mean()
    paired = math.sqrt(float((resid ** 2).sum()) / ((len(values) - 1) * (len(seeds) - 1)))
    return within, paired, n


def conclusion(result: dict) -> str:
    """One sentence, from the numbers: is the spread of mean strict bpb across values within seed noise?

    With noise s (std of one run) and n seeds per value, two value means differ by noise alone up
    to about 2 standard errors of their difference, 2 * s * sqrt(2 / n): the range of the means
    (best vs worst value) is compared with that bar, once for the seed-to-seed noise (pooled
    within-value std) and once for the noise left when values are compared within each seed.
    The bar is loose (no correction for picking the extreme pair): "flat" is claimed only when
    even the best and worst values are not clearly apart.
    """
    rows = result.get("summary") or summarize(result)
    param = result["param"]
    best = min(rows, key=lambda r: r["strict_mean"])
    worst = max(rows, key=lambda r: r["strict_mean"])
    spread = worst["strict_mean"] - best["strict_mean"]
    head = (f"Across {param} in {{{', '.join(str(r['value']) for r in rows)}}} the mean strict bpb spans "
            f"{spread:.4f} (best {param}={best['value']}: {best['strict_mean']:.4f}, worst "
            f"{param}={worst['value']}: {worst['strict_mean']:.4f})")
    within, paired, n = seed_noise(result)
    if within is None:
        return head + ", but with one seed per value there is no seed-noise estimate to compare it with."
    bar = 2 * within * math.sqrt(2 / n)
    inside = spread <= bar
    text = (f"{head}, {'within' if inside else 'larger than'} the seed noise (two means differ by noise "
            f"up to about {bar:.4f}, from a within-value std {within:.4f} over {n} seeds)")
    if paired is None:
        return text + "."
    paired_bar = 2 * paired * math.sqrt(2 / n)
    paired_inside = spread <= paired_bar
    verdict = {(True, True): f"so these runs show no effect of {param}",
               (True, False): f"so the effect of {param} is smaller than seed-to-seed variation "
                              "but consistent across seeds",
               (False, False): f"so {param} matters at this scale",
               (False, True): "so the means differ by more than seed noise but not consistently "
                              "within seeds"}[inside, paired_inside]
    return (f"{text} and {'within' if paired_inside else 'larger than'} the noise of comparing values "
            f"within a seed (same init, batches and masks: up to about {paired_bar:.4f}), {verdict}.")


def write_report(result: dict, out_dir: Path) -> None:
    """OUT/ablation.json, ablation.md (a table per value) and ablation.png (mean strict bpb vs value)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result.setdefault("summary", summarize(result))
    result.setdefault("conclusion", conclusion(result))
    write_text_atomic(out_dir / "ablation.json", json.dumps(result, indent=2) + "\n")
    write_text_atomic(out_dir / "ablation.md", markdown_table(result))
    plot(result, out_dir / "ablation.png")


def markdown_table(result: dict) -> str:
    param, ev, cfg = result["param"], result["eval"], result["base_config"]
    lines = [f"## Ablation of {param}",
             "",
             f"Everything else fixed: {cfg['num_layers']} layers, width {cfg['model_dim']}, seq {cfg['seq_len']}, "
             f"{cfg['steps']} steps of {cfg['batch_rows'] * cfg['grad_accum']} rows, layout {cfg['layout']}; "
             f"seeds {', '.join(map(str, result['seeds']))}. Strict and anchored bpb: {ev['elbo_steps']}-step "
             f"ELBO on {ev['eval_num_seqs']} val slices, mask seed {ev['seed']} for every run. "
             f"Full config in ablation.json.",
             "",
             f"| {param} | mean strict bpb | spread over seeds (std; min-max) | mean anchored bpb | params | runs |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in result["summary"]:
        std = "-" if r["strict_std"] is None else f"{r['strict_std']:.4f}"
        params = " / ".join(f"{p:,}" for p in r["num_params"])
        lines.append(f"| {r['value']} | {r['strict_mean']:.4f} | {std}; {r['strict_min']:.4f}-{r['strict_max']:.4f} "
                     f"| {r['anchored_mean']:.4f} | {params} | {r['runs']} |")
    return "\n".join(lines + ["", result["conclusion"], ""])


def plot(result: dict, path: Path) -> None:
    """Mean strict bpb vs value with std error bars, and each seed's runs as a thin line; log2 x for
    positive values spanning a factor of 4 or more (head counts, widths)."""
    import matplotlib  # imported here: a heavy import only the figure needs

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, param = result["summary"], result["param"]
    xs = [r["value"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        ax.errorbar(xs, [r["strict_mean"] for r in rows], yerr=[r["strict_std"] or 0.0 for r in rows],
                    marker="o", capsize=4, label="mean strict bpb (± std over seeds)")
        for i, seed in enumerate(result["seeds"]):  # one seed's runs share init, batches and masks
            runs = sorted((r["value"], r["strict_bpb"]) for r in result["runs"] if r["seed"] == seed)
            ax.plot(*zip(*runs), color="gray", alpha=0.5, lw=0.8, marker=".", ms=5,
                    label="each seed" if i == 0 else None)
        if min(xs) > 0 and max(xs) / min(xs) >= 4:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ev = result["eval"]
        ax.set(xlabel=param, ylabel="strict bpb (ELBO upper bound)",
               title=f"{param} ablation: {ev['elbo_steps']}-step ELBO, {ev['eval_num_seqs']} slices, "
                     f"{len(result['seeds'])} seed(s)")
        ax.title.set_fontsize(10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        write_png(fig, path, dpi=120)
    finally:
        plt.close(fig)
