"""bpb against block size from one or more `mdlm-golf race` results (race.json), with the AR yardstick.

    python bench/block_race.py runs/race_blocks/race.json [runs/race_blocks600/race.json ...] --out docs/blocks.png

A recipe's block size is its config's block_size (0 = the whole row, seq_len). The MDLM point at
seq_len is the race's `best` recipe (block_size 0); AR is drawn as a horizontal line. Prints, per race,
a table of block size, bpb (mean ± std over seeds, per seed) and the share of the gap between the best
MDLM and AR that each block size closes.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def block_points(race: dict) -> tuple[dict[int, list[float]], list[float], int]:
    """({block size: [bpb per seed]} for the MDLM recipes, [AR bpb per seed], seq_len)."""
    seq_len = race["base_config"]["seq_len"]
    blocks: dict[int, list[float]] = {}
    ar = []
    for run in race["runs"]:
        overrides = race["recipes"][run["value"]]
        if overrides.get("objective") == "ar":
            ar.append(run["strict_bpb"])
            continue
        block = int(overrides.get("block_size", "0")) or seq_len
        blocks.setdefault(block, []).append(run["strict_bpb"])
    return dict(sorted(blocks.items())), ar, seq_len


def table(race: dict, name: str) -> str:
    blocks, ar, seq_len = block_points(race)
    cfg = race["base_config"]
    best, ar_mean = float(np.mean(blocks[seq_len])), float(np.mean(ar))
    lines = [f"{name}: {cfg['steps']} steps x {cfg['batch_rows'] * cfg['grad_accum'] * cfg['seq_len']:,} tokens, "
             f"seeds {race['seeds']}; AR (exact chain rule) {ar_mean:.4f} ({', '.join(f'{b:.4f}' for b in ar)})",
             "| block size | strict bpb (mean ± std) | per seed | gap to AR | share of the best-MDLM gap closed |",
             "|---:|---:|---|---:|---:|"]
    for block, values in blocks.items():
        mean, std = float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        closed = (best - mean) / (best - ar_mean)
        label = f"{block} (= seq_len, best)" if block == seq_len else str(block)
        lines.append(f"| {label} | {mean:.4f} ± {std:.4f} | {', '.join(f'{v:.4f}' for v in values)} | "
                     f"{mean - ar_mean:+.4f} | {closed:.0%} |")
    return "\n".join(lines)


def plot(races: list[tuple[str, dict]], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (name, race) in enumerate(races):
        blocks, ar, _ = block_points(race)
        sizes = list(blocks)
        means = [np.mean(v) for v in blocks.values()]
        stds = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in blocks.values()]
        color = f"C{i}"
        ax.errorbar(sizes, means, yerr=stds, marker="o", capsize=3, color=color,
                    label=f"MDLM, {race['base_config']['steps']} steps")
        ax.axhline(np.mean(ar), color=color, linestyle="--", label=f"AR, {race['base_config']['steps']} steps")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("block size (tokens; the last point is the whole row)")
    ax.set_ylabel("strict bpb (32-step ELBO bound; AR exact)")
    ax.set_title("Block diffusion: bpb against block size")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("races", nargs="+", type=Path, help="race.json files")
    parser.add_argument("--out", type=Path, default=Path("docs/blocks.png"))
    args = parser.parse_args()
    races = [(str(p.parent), json.loads(p.read_text())) for p in args.races]
    for name, race in races:
        print(table(race, name) + "\n")
    plot(races, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
