"""Command line: main, its one-line errors and exit codes, and one cmd_* per subcommand.

The flags live in cli_parser; every command calls a function of the package.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

from .artifact import OversizeError, export_artifact, format_size_table, load_artifact
from .checkpoint import load_model, run_checkpoint
from .cli_parser import (DEFAULT_CODER_PASSES, DEFAULT_EVAL_PASSES, UsageError, add_ablate, add_compress,
                         add_decompress, add_demo, add_download, add_eval, add_export, add_prepare, add_race,
                         add_sample, add_submission, add_train, config_overrides, new_parser, parse_seeds,
                         planned_schedule)
from .coder import compress_file, decompress_file
from .config import build_config
from .data import ByteTable, DataError, load_split, load_tokenizer, prepare, read_manifest
from .data.download import download
from .demo import run_demo
from .dist import init_distributed, pick_device, shutdown
from .eval import MODES, evaluate, format_headline, format_result, projected_seconds
from .experiments import RECIPES, ablate, parse_recipe, race
from .files import check_output, write_bytes_atomic, write_text_atomic
from .sampling import decode_rows, generate
from .submission import script_bytes, write_submission
from .train import RunInterrupted, check_run_dir, resume_config, train
from .train.rundir import RUN_FILES

TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp\d+$")  # files.atomic_path's temporary of NAME


def tokenizer_path(given: str | None, recorded: str | None = None, data_dir: Path | None = None,
                   source: str = "the model") -> Path:
    """The tokenizer a command uses: --tokenizer if given, else the one the run or artifact recorded,
    else the one prepare recorded in DIR/manifest.json (when the command reads a data folder)."""
    if given or recorded:
        return Path(given or recorded)
    if data_dir is None:
        raise ValueError(f"{source} records no tokenizer; pass --tokenizer MODEL")
    path = Path(data_dir) / "manifest.json"
    manifest = read_manifest(data_dir)
    if manifest is None:
        raise ValueError(f"{path}: not found; pass --tokenizer MODEL")
    if not isinstance(manifest.get("tokenizer"), str):
        raise DataError(f"{path}: names no \"tokenizer\"; pass --tokenizer MODEL")
    return Path(manifest["tokenizer"])


def same_path(a: Path, b: Path) -> bool:
    """Whether two paths name the same folder (`train --resume R --out R`: the user's own command)."""
    return a.resolve() == b.resolve()


def run_files(run_dir: str | None) -> list[Path]:
    """The files of a run folder a command reads from (weights, checkpoint, config, logs): never written."""
    return [Path(run_dir) / name for name in RUN_FILES] if run_dir else []


def load_scored_model(args: argparse.Namespace, device):
    """(model, config, checkpoint or artifact metadata) of --artifact (what the entry ships) or --run."""
    if args.artifact:
        return load_artifact(Path(args.artifact), device)
    return load_model(run_checkpoint(Path(args.run)), device)


def coder_model(args: argparse.Namespace):
    """The run's model on the CPU (the coder needs bit-identical float32) and its tokenizer."""
    model, cfg, state = load_model(run_checkpoint(Path(args.run)), "cpu")
    sp = load_tokenizer(tokenizer_path(args.tokenizer, state.get("tokenizer"), source=str(args.run)))
    return model, cfg, sp


def planned_options(args: argparse.Namespace, cfg, default_passes: int) -> dict:
    """The decoding order and schedule of `eval --method planned` and `compress`: the flags where given,
    else the model's own (an AR model: left to right, one token per pass; a diffusion model: confidence
    order in default_passes passes)."""
    if cfg.autoregressive and args.passes is None and args.tokens_per_pass is None:
        return {"order": args.order or "left-to-right", "tokens_per_pass": 1}
    return {"order": args.order or "confidence", **planned_schedule(args, default_passes)}


def cmd_prepare(args: argparse.Namespace) -> None:
    """mdlm-golf prepare: tokenize a docs JSONL into shards and a manifest."""
    manifest = prepare(Path(args.docs), Path(args.out), Path(args.tokenizer) if args.tokenizer else None,
                       args.vocab_size, args.val_docs, args.shard_tokens, overwrite=args.overwrite)
    for split in ("val", "train"):
        m = manifest[split]
        print(f"{split}: {m['docs']:,} docs, {m['tokens']:,} tokens, {len(m['shards'])} shard(s)")
    print(f"tokenizer {manifest['tokenizer']}; manifest {Path(args.out) / 'manifest.json'}")


def cmd_train(args: argparse.Namespace) -> None:
    """mdlm-golf train: a new run (--out) or a resumed one (--resume)."""
    same_folder = bool(args.resume and args.out) and same_path(Path(args.resume), Path(args.out))
    if args.resume and ((args.out and not same_folder) or args.overwrite):
        other = f"--out {args.out}" if args.out and not same_folder else "--overwrite"
        raise ValueError(f"--resume {args.resume} continues that run in place; {other} is for a new run: "
                         f"pass one of them")
    if args.resume:
        run_dir = Path(args.resume)
        cfg = resume_config(run_dir, config_overrides(args))
    elif args.out:
        run_dir = Path(args.out)
        cfg = build_config(args.preset, overrides=config_overrides(args))
        check_run_dir(run_dir, args.overwrite)
    else:
        raise ValueError("train needs --out RUN (a new run) or --resume RUN")
    train(cfg, Path(args.data), run_dir, tokenizer_path(args.tokenizer, data_dir=Path(args.data)),
          run_eval=not args.no_eval, resume=bool(args.resume), replace=args.overwrite)


def cmd_ablate(args: argparse.Namespace) -> None:
    """mdlm-golf ablate: one run per value x seed of a config field."""
    base = build_config(args.preset, overrides=config_overrides(args))
    seeds = parse_seeds(args.seeds) if args.seeds else [base.seed]
    ablate(base, args.param.replace("-", "_"), args.values.split(","), seeds, Path(args.data),
           Path(args.out), tokenizer_path(args.tokenizer, data_dir=Path(args.data)))


def cmd_race(args: argparse.Namespace) -> None:
    """mdlm-golf race: recipes against each other at equal tokens, FLOPs or seconds."""
    base = build_config(args.preset, overrides=config_overrides(args))
    seeds = parse_seeds(args.seeds)
    names = args.recipes.split(",") if args.recipes else ([] if args.recipe else list(RECIPES))
    recipes = dict(parse_recipe(text) for text in [*names, *(args.recipe or [])])
    race(base, recipes, seeds, Path(args.data), Path(args.out), tokenizer_path(args.tokenizer, data_dir=Path(args.data)),
         equal=args.equal)


def cmd_eval(args: argparse.Namespace) -> None:
    """mdlm-golf eval: bits per byte of a run or an artifact on the val split."""
    env = init_distributed()
    if args.json:
        check_output(Path(args.json), args.overwrite, [*run_files(args.run), *filter(None, [args.artifact])])
    model, cfg, state = load_scored_model(args, env.device)
    tokenizer = tokenizer_path(args.tokenizer, state.get("tokenizer"), Path(args.data))
    byte_table = ByteTable.from_tokenizer(load_tokenizer(tokenizer), cfg.vocab_size)
    val = load_split(Path(args.data), "val", cfg.vocab_size)
    if args.batch_rows is not None:
        cfg = dataclasses.replace(cfg, eval_batch_rows=args.batch_rows)
    # unset flags take the run's own eval settings: the same run gives the same figure both ways
    options = dict(method=args.method, num_seqs=cfg.eval_num_seqs if args.num_seqs is None else args.num_seqs,
                   modes=MODES if args.mode == "both" else (args.mode,), device=env.device)
    if args.method == "planned":
        options.update(planned_options(args, cfg, DEFAULT_EVAL_PASSES))
    else:
        options.update(steps=args.elbo_steps, seed=args.seed, draws=args.draws, grid=args.grid)
    results = evaluate(model, val, byte_table, cfg, **options)
    if not env.is_main:
        return
    for r in results.values():
        print(format_result(r))
        print(f"         {r['eval_seconds']:.1f}s on {r['world_size']} process(es); the whole split "
              f"({val.size:,} tokens) would take ~{projected_seconds(r, val.size):.0f}s on 8 such devices")
    if args.method == "elbo" and "strict" in results or "ar" in results:
        print(format_headline(results))
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(results, indent=2) + "\n")


def cmd_compress(args: argparse.Namespace) -> None:
    """mdlm-golf compress: a file -> an MDZ1 file."""
    try:  # read before loading the model: a bad path fails at once
        data = Path(args.input).read_bytes()
    except OSError as e:
        raise ValueError(f"{args.input}: cannot read ({e.strerror or e})") from None
    check_output(Path(args.output), args.overwrite, [Path(args.input), *run_files(args.run)])
    model, cfg, sp = coder_model(args)
    info = compress_file(model, cfg, sp, data, Path(args.output), mode=args.mode,
                         **planned_options(args, cfg, DEFAULT_CODER_PASSES))
    rate = f"{info['bits_per_byte']:.4f} bits/byte" if info["input_bytes"] else "empty input: no bits/byte"
    print(f"{args.input}: {info['input_bytes']:,} bytes ({info['escaped_bytes']:,} escaped), "
          f"{info['tokens']:,} tokens -> {args.output}: {info['file_bytes']:,} bytes "
          f"({rate}, header {info['header_bytes']} bytes, "
          f"escape section {info['escape_section_bytes']} bytes)", file=sys.stderr)


def cmd_decompress(args: argparse.Namespace) -> None:
    """mdlm-golf decompress: an MDZ1 file -> the original bytes."""
    check_output(Path(args.output), args.overwrite, [Path(args.input), *run_files(args.run)])
    model, cfg, sp = coder_model(args)
    data = decompress_file(model, cfg, sp, Path(args.input))
    write_bytes_atomic(Path(args.output), data)
    print(f"{args.input} -> {args.output}: {len(data):,} bytes", file=sys.stderr)


def cmd_export(args: argparse.Namespace) -> None:
    """mdlm-golf export: a run's weights -> the quantized, compressed artifact, with its size table."""
    packed = {"packed": True, "bytes": False, "best": None}[args.layout]
    for output in filter(None, [args.out, args.json]):
        check_output(Path(output), args.overwrite, run_files(args.run))
    try:  # code bytes: the record script a submission ships (train_mdlm.py), not the package's files
        report = export_artifact(run_checkpoint(Path(args.run)), Path(args.out), args.quant, args.compressor,
                                 code_bytes=script_bytes(), method=args.method, packed=packed,
                                 small_numel=args.small_numel,
                                 calib_data=Path(args.data) if args.data else None,
                                 allow_oversize=args.allow_oversize)
    except OversizeError as e:
        print(format_size_table(e.report), file=sys.stderr)
        raise
    print(format_size_table(report))
    print(f"wrote {args.out}; score it with: mdlm-golf eval --artifact {args.out} --data DIR")
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(report, indent=2) + "\n")


def cmd_submission(args: argparse.Namespace) -> None:
    """mdlm-golf submission: score the artifact and write a record folder."""
    check_record_folder(Path(args.out), args.overwrite, [Path(args.run), Path(args.artifact).parent,
                                                         Path(args.data)])
    device = pick_device()
    model, cfg, meta = load_artifact(Path(args.artifact), device)
    tokenizer = tokenizer_path(args.tokenizer, meta.get("tokenizer"), Path(args.data))
    byte_table = ByteTable.from_tokenizer(load_tokenizer(tokenizer), cfg.vocab_size)
    results = evaluate(model, load_split(Path(args.data), "val", cfg.vocab_size), byte_table, cfg,
                       steps=args.elbo_steps, num_seqs=args.num_seqs, seed=args.seed, device=device)
    info = write_submission(Path(args.run), Path(args.artifact), Path(args.out), name=args.name,
                            github_id=args.github_id, eval_results=results, size_report=meta,
                            hardware=args.hardware, seeds=[cfg.seed], overwrite=args.overwrite)
    print(json.dumps(info, indent=2))


def check_record_folder(out: Path, overwrite: bool, reads: list[Path]) -> None:
    """Before any scoring: the record folder is neither a folder the command reads (nor holds one), and
    it holds no files unless overwrite."""
    target = out.resolve()
    for folder in reads:
        source = folder.resolve()
        if target == source or target in source.parents:
            raise ValueError(f"{out}: the record folder would replace {folder}, which this command reads")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out}: holds files; pass --overwrite to replace the record folder")


def cmd_demo(args: argparse.Namespace) -> None:
    """mdlm-golf demo: end to end on stdlib text."""
    run_demo(Path(args.out), steps=args.steps)


def cmd_download(args: argparse.Namespace) -> None:
    """mdlm-golf download: the challenge's shards and tokenizer."""
    out = Path(args.out)
    paths = download(out, args.variant, args.train_shards, repo_id=args.repo_id,
                     remote_root=args.remote_root, progress=not args.quiet)
    tokenizer = next((p for p in paths if p.parent.name == "tokenizers" and p.suffix == ".model"), None)
    print(f"{len(paths)} files under {out}; train with --data {out / 'datasets' / f'fineweb10B_{args.variant}'}"
          + (f" --tokenizer {tokenizer}" if tokenizer else ""))


def cmd_sample(args: argparse.Namespace) -> None:
    """mdlm-golf sample: generate text; the samples go to stdout, the timing to stderr."""
    device = pick_device()
    model, cfg, meta = load_scored_model(args, device)
    sp = load_tokenizer(tokenizer_path(args.tokenizer, meta.get("tokenizer")))
    result = generate(model, cfg, num=args.num, length=args.length, steps=args.steps, sampler=args.sampler,
                      prompt_ids=sp.encode(args.prompt) if args.prompt else None,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed, device=device)
    for i, (row, text) in enumerate(zip(result.rows, decode_rows(sp, result.rows))):  # the data: stdout
        print(f"--- sample {i} ({len(row) - 1} tokens)")
        print(text)
    print(f"--- {result.generated_tokens} tokens generated in {result.elapsed:.2f}s: "
          f"{result.tokens_per_s:,.1f} tokens/s | {result.nfe} network evaluations for {args.steps} steps "
          f"(per sample {result.row_nfe}) | {result.positions:,} positions | "
          f"{'left-to-right (AR)' if cfg.autoregressive else args.sampler} on {device}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    """The mdlm-golf parser: each subcommand's flags (from cli_parser) bound to the cmd_* that runs it."""
    parser, sub = new_parser()
    for add, command in [(add_prepare, cmd_prepare), (add_train, cmd_train), (add_ablate, cmd_ablate),
                         (add_race, cmd_race), (add_eval, cmd_eval), (add_compress, cmd_compress),
                         (add_decompress, cmd_decompress), (add_export, cmd_export),
                         (add_submission, cmd_submission), (add_download, cmd_download),
                         (add_demo, cmd_demo), (add_sample, cmd_sample)]:
        add(sub).set_defaults(func=command)
    return parser


def one_line(message: str) -> str:
    """A message's lines joined into one (a library's multi-line error, say)."""
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def describe_os_error(e: OSError) -> str:
    """'FILE: reason', the file as the user named it (an atomic write's temporary shown as its target)."""
    names = []
    for name in (e.filename, e.filename2):
        if name is not None:
            path = Path(os.fsdecode(name))
            temp = TEMP_NAME.match(path.name)
            shown = str(path.with_name(temp["name"]) if temp else path)
            names += [shown] if shown not in names else []
    reason = e.strerror or str(e)
    return f"{' -> '.join(names)}: {reason}" if names else reason


class Terminated(Exception):
    """SIGTERM, raised in the main thread (the default action would end the process without a word)."""


def raise_terminated(signum, frame) -> None:
    raise Terminated


# commands whose long stretches run in C (quantizing, compressing, the coder's forwards): run off the main
# thread, so a signal is seen within a poll interval instead of when the C call returns
BACKGROUND_COMMANDS = ("export", "compress", "decompress")
POLL_SECONDS = 0.1


def run_in_background(func: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> None:
    """func(args) in a daemon thread while the main thread waits in short polls (where signals land); its
    exception is raised here. Interrupted, the thread is left to die with the process: its atomic write
    leaves at most a temporary, which the next write of that file removes."""
    failure: list[BaseException] = []

    def work() -> None:
        try:
            func(args)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread as it is
            failure.append(e)

    worker = threading.Thread(target=work, name=f"mdlm-golf {args.command}", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(POLL_SECONDS)
    if failure:
        raise failure[0]


def run_command(args: argparse.Namespace) -> None:
    """The command, under a SIGTERM handler that turns the signal into one line (train, race and ablate
    install their own while training: a checkpoint first)."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, raise_terminated) if main_thread else None
    try:
        if args.command in BACKGROUND_COMMANDS and main_thread:
            run_in_background(args.func, args)
        else:
            args.func(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Run one command; every expected failure is one line `mdlm-golf CMD: error: ...` and exit 2; a
    signal is one line and 130 (SIGINT) or 143 (SIGTERM)."""
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    code = run_reporting(args)
    if code in (130, 143) and args.command in BACKGROUND_COMMANDS:
        # a signal stopped a background command mid-way: end without the interpreter's shutdown, which would
        # wait on, or abort inside (torch's threads), the C calls it left running
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def run_reporting(args: argparse.Namespace) -> int:
    """Run the parsed command; report its failure in one line; the exit status."""
    clean, name = False, f"mdlm-golf {args.command}"
    try:
        run_command(args)
        clean = True
    except BrokenPipeError:  # stdout piped into `head`: stop quietly, and let no flush at exit complain
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # a stdout without a descriptor (captured) has nothing to flush
            pass
        return 1
    except RunInterrupted as e:  # a race's or an ablation's run, checkpointed
        print(f"{name}: interrupted: {one_line(str(e))}", file=sys.stderr)
        return 143 if e.signal == "SIGTERM" else 130
    except (ValueError, FloatingPointError) as e:  # DataError, CheckpointError, UnicodeError ... are ValueErrors
        print(f"{name}: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # a missing folder, a directory in the way, a full disk, no permission
        print(f"{name}: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"{name}: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    finally:
        shutdown(clean)  # leave the torchrun process group cleanly, or a rank can abort at exit
    return 0
