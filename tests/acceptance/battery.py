"""Issue 12's acceptance battery, every case in one go, printing the table BENCHMARKS.md quotes.

    python tests/acceptance/battery.py [--work DIR] [--json PATH] [--only TEXT] [--list]

The same cases and judging as `python -m pytest tests/acceptance` (runner.py explains both). The table
goes to stdout, progress to stderr; the exit status is 1 if any case fails. --only TEXT runs the cases
whose "category / name" contains TEXT; --work must be new or empty (default: a temporary folder, removed
at the end).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

# Run as a script, Python puts this folder on sys.path; the battery is the package `acceptance` of its parent.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from acceptance import (test_artifact, test_checkpoint, test_crafted_sizes, test_directory,  # noqa: E402
                        test_docs, test_download, test_faults, test_flags, test_full_disk, test_manifest, test_mdz,
                        test_missing, test_overwrite, test_permission, test_race_signals, test_roundtrip,
                        test_run_writes, test_sanity, test_shards, test_sigterm, test_text, test_under_file)
from acceptance.runner import (Case, Ctx, Outcome, SetupError, build_base, failed, new_ctx, report,  # noqa: E402
                               results_json, run_case)

# the categories in the table's order
FACTORIES = (test_sanity.sanity_cases, test_flags.flag_cases, test_text.text_cases, test_missing.missing_cases,
             test_directory.directory_cases, test_under_file.under_file_cases, test_permission.permission_cases,
             test_full_disk.full_disk_cases, test_shards.shard_cases, test_manifest.manifest_cases,
             test_docs.docs_cases, test_checkpoint.checkpoint_cases, test_artifact.artifact_cases,
             test_mdz.mdz_cases, test_crafted_sizes.crafted_size_cases, test_overwrite.overwrite_cases,
             test_run_writes.run_write_cases, test_faults.fault_cases, test_sigterm.sigterm_cases,
             test_race_signals.race_signal_cases, test_download.download_cases, test_roundtrip.roundtrip_cases)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, help="work folder (kept); default a temporary folder, removed at the end")
    p.add_argument("--json", type=Path, help="write the per-case results here")
    p.add_argument("--only", action="append", default=[],
                   help="run only cases whose 'category / name' contains this text (repeatable)")
    p.add_argument("--list", action="store_true", help="list the cases and exit (after the setup)")
    return p.parse_args()


def all_cases(ctx: Ctx, only: list[str]) -> list[Case]:
    cases = [slot.make(ctx) for factory in FACTORIES for slot in factory()]
    return [c for c in cases if not only or any(t in f"{c.category} / {c.name}" for t in only)]


def run_all(ctx: Ctx, cases: list[Case]) -> list[Outcome]:
    """Every case in turn, a progress line each on stderr."""
    outcomes = []
    for i, case in enumerate(cases, 1):
        outcome = run_case(ctx, case, i)
        outcomes.append(outcome)
        status = "skip" if outcome.skipped else "pass" if outcome.passed else "FAIL"
        detail = "" if outcome.passed or outcome.skipped else f"  <- {'; '.join(outcome.problems)}"
        print(f"[{i:3d}/{len(cases)}] {status} {case.category} / {case.name} (exit {outcome.exit}, "
              f"{outcome.seconds:.1f}s){detail}", file=sys.stderr, flush=True)
    return outcomes


def main() -> int:
    args = parse_args()
    torch.set_num_threads(1)
    began = time.monotonic()
    work = args.work or Path(tempfile.mkdtemp(prefix="hostile-"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        raise SystemExit(f"hostile: {work} is not empty; give a new or empty --work folder")
    ctx = new_ctx(work)
    print(f"hostile: work folder {work}; CLI {' '.join(ctx.command)}", file=sys.stderr)
    try:
        build_base(ctx)
        cases = all_cases(ctx, args.only)
        if args.list:
            print("\n".join(f"{c.category} / {c.name}" for c in cases))
            return 0
        outcomes = run_all(ctx, cases)
    except SetupError as e:
        raise SystemExit(str(e)) from None
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    minutes = (time.monotonic() - began) / 60
    print(report(outcomes, minutes))
    if args.json:
        args.json.write_text(results_json(outcomes, minutes))
    return 1 if failed(outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
