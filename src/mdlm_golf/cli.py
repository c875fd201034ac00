"""Command line: argument parsing only; every command calls a function of the package."""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Callable

from .artifact import OversizeError, export_artifact, format_size_table, load_artifact
from .checkpoint import load_model, run_checkpoint
from .coder import compress_file, decompress_file
from .config import (MAX_SEED, MAX_VOCAB, PRESETS, build_config, check_field, describe_range, field_types,
                     in_range, parse_value)
from .data import MIN_VOCAB, ByteTable, DataError, load_split, load_tokenizer, prepare, read_manifest
from .data.download import download
from .demo import run_demo
from .diffusion import GRIDS
from .dist import init_distributed, shutdown
from .eval import (MODES, ORDERS, evaluate, evaluate_planned, format_planned_result, format_result,
                   projected_seconds)
from .experiments import RECIPES, ablate, parse_recipe, race
from .files import write_bytes_atomic, write_text_atomic
from .sampling import decode_rows, generate
from .submission import write_submission
from .train import claim_run_dir, pick_device, resume_config, train

TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp\d+$")  # files.atomic_path's temporary of NAME


class UsageError(Exception):
    """A command line argparse rejects; the message is the one line main prints."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (`mdlm-golf CMD: error: ...`), exit 2 from main, no usage dump."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def ranged(kind: type, low: float, high: float = math.inf, low_in: bool = True,
           high_in: bool = False) -> Callable[[str], float]:
    """An argparse type= for a number in a range; anything else is an error that states the range."""
    accepted = describe_range(low, high, low_in, high_in)

    def parse(raw: str):
        try:
            value = kind(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a{' whole' if kind is int else ''} number {accepted}, "
                                             f"got {raw!r}") from None
        if not in_range(value, low, high, low_in, high_in):
            raise argparse.ArgumentTypeError(f"must be {accepted}, got {raw}")
        return value

    return parse


POSITIVE = ranged(int, 1)
COUNT = ranged(int, 0)  # 0 allowed: "none" or "all", as each flag's help says
SEED = ranged(int, 0, MAX_SEED, high_in=True)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One --kebab-case flag per Config field (default None: unset flags leave env/preset alone)."""
    group = parser.add_argument_group("config fields (also settable as UPPER_CASE env vars)")
    for name, kind in field_types().items():
        group.add_argument(f"--{name.replace('_', '-')}", dest=name, type=str, default=None,
                           metavar=kind.__name__.upper())


def config_overrides(args: argparse.Namespace) -> dict:
    return {name: parse_value(name, getattr(args, name))
            for name in field_types() if getattr(args, name, None) is not None}


def tokenizer_for(data_dir: Path, given: str | None) -> Path:
    """--tokenizer if given, else the one prepare recorded in DIR/manifest.json."""
    if given:
        return Path(given)
    path = Path(data_dir) / "manifest.json"
    manifest = read_manifest(data_dir)
    if manifest is None:
        raise ValueError(f"{path}: not found; pass --tokenizer MODEL")
    if not isinstance(manifest.get("tokenizer"), str):
        raise DataError(f"{path}: names no \"tokenizer\"; pass --tokenizer MODEL")
    return Path(manifest["tokenizer"])


def parse_seeds(text: str) -> list[int]:
    """Comma-separated seeds, each a valid Config.seed."""
    seeds = [parse_value("seed", s) for s in text.split(",")]
    for seed in seeds:
        check_field("seed", seed, int)
    return seeds


def cmd_prepare(args: argparse.Namespace) -> None:

    manifest = prepare(Path(args.docs), Path(args.out), Path(args.tokenizer) if args.tokenizer else None,
                       args.vocab_size, args.val_docs, args.shard_tokens, overwrite=args.overwrite)
    for split in ("val", "train"):
        m = manifest[split]
        print(f"{split}: {m['docs']:,} docs, {m['tokens']:,} tokens, {len(m['shards'])} shard(s)")
    print(f"tokenizer {manifest['tokenizer']}; manifest {Path(args.out) / 'manifest.json'}")


def cmd_train(args: argparse.Namespace) -> None:

    if args.resume:
        run_dir = Path(args.resume)
        cfg = resume_config(run_dir, config_overrides(args))
    elif args.out:
        run_dir = Path(args.out)
        cfg = build_config(args.preset, overrides=config_overrides(args))
        claim_run_dir(run_dir, args.overwrite)  # after the config checks: a bad flag deletes nothing
    else:
        raise ValueError("train needs --out RUN (a new run) or --resume RUN")
    train(cfg, Path(args.data), run_dir, tokenizer_for(Path(args.data), args.tokenizer),
          run_eval=not args.no_eval, resume=bool(args.resume))


def cmd_ablate(args: argparse.Namespace) -> None:

    base = build_config(args.preset, overrides=config_overrides(args))
    seeds = parse_seeds(args.seeds) if args.seeds else [base.seed]
    ablate(base, args.param.replace("-", "_"), args.values.split(","), seeds, Path(args.data),
           Path(args.out), tokenizer_for(Path(args.data), args.tokenizer))


def cmd_race(args: argparse.Namespace) -> None:

    base = build_config(args.preset, overrides=config_overrides(args))
    seeds = parse_seeds(args.seeds)
    names = args.recipes.split(",") if args.recipes else ([] if args.recipe else list(RECIPES))
    recipes = dict(parse_recipe(text) for text in [*names, *(args.recipe or [])])
    race(base, recipes, seeds, Path(args.data), Path(args.out), tokenizer_for(Path(args.data), args.tokenizer))


def cmd_eval(args: argparse.Namespace) -> None:

    env = init_distributed()
    if args.artifact:

        model, cfg, state = load_artifact(Path(args.artifact), env.device)  # scores what ships
    else:
        model, cfg, state = load_model(run_checkpoint(Path(args.run)), env.device)
    tokenizer = Path(args.tokenizer or state.get("tokenizer") or tokenizer_for(Path(args.data), None))
    byte_table = ByteTable.from_tokenizer(load_tokenizer(tokenizer), cfg.vocab_size)
    val = load_split(Path(args.data), "val", cfg.vocab_size)
    if args.batch_rows is not None:
        cfg.eval_batch_rows = args.batch_rows
    # unset flags take the run's own eval settings: the same run gives the same figure both ways
    steps = cfg.elbo_steps if args.elbo_steps is None else args.elbo_steps
    num_seqs = cfg.eval_num_seqs if args.num_seqs is None else args.num_seqs
    seed = cfg.seed if args.seed is None else args.seed
    modes = MODES if args.mode == "both" else (args.mode,)
    if args.method == "planned":

        results = evaluate_planned(model, val, byte_table, cfg, order=args.order,
                                   **planned_schedule(args, DEFAULT_EVAL_PASSES), num_seqs=num_seqs,
                                   modes=modes, device=env.device)
        describe = format_planned_result
    else:
        results = evaluate(model, val, byte_table, cfg, steps=steps, num_seqs=num_seqs, seed=seed, modes=modes,
                           draws=args.draws, grid=args.grid, device=env.device)
        describe = format_result
    if not env.is_main:
        return
    for r in results.values():
        print(describe(r))
        print(f"         {r['eval_seconds']:.1f}s on {r['world_size']} process(es); the whole split "
              f"({val.size:,} tokens) would take ~{projected_seconds(r, val.size):.0f}s on 8 such devices")
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(results, indent=2) + "\n")


DEFAULT_EVAL_PASSES = 128
DEFAULT_CODER_PASSES = 64


def planned_schedule(args: argparse.Namespace, default_passes: int) -> dict:
    """--tokens-per-pass m or --passes P (default P) as evaluate_planned / compress_file keywords."""
    if args.tokens_per_pass is not None:
        return {"tokens_per_pass": args.tokens_per_pass}
    return {"passes": args.passes if args.passes is not None else default_passes}


def add_planned_flags(p: argparse.ArgumentParser, default_passes: int) -> None:
    p.add_argument("--order", choices=ORDERS, default="confidence",
                   help="which masked positions each pass reveals: the leftmost, or those the model is "
                        "surest of (highest probability, or largest top1-top2 margin)")
    schedule = p.add_mutually_exclusive_group()
    schedule.add_argument("--passes", type=POSITIVE, default=None,
                          help=f"network evaluations per slice, spread evenly (default {default_passes}); "
                               "P = seq_len with left-to-right is the chain rule")
    schedule.add_argument("--tokens-per-pass", type=POSITIVE, default=None,
                          help="reveal m tokens per pass instead")


def coder_model(args: argparse.Namespace):
    """The run's model on the CPU (the coder needs bit-identical float32) and its tokenizer."""

    model, cfg, state = load_model(run_checkpoint(Path(args.run)), "cpu")
    tokenizer = args.tokenizer or state.get("tokenizer")
    if not tokenizer:
        raise ValueError(f"{args.run}: the run records no tokenizer; pass --tokenizer MODEL")
    return model, cfg, load_tokenizer(Path(tokenizer))


def cmd_compress(args: argparse.Namespace) -> None:

    try:  # read before loading the model: a bad path fails at once
        data = Path(args.input).read_bytes()
    except OSError as e:
        raise ValueError(f"{args.input}: cannot read ({e.strerror or e})") from None
    model, cfg, sp = coder_model(args)
    info = compress_file(model, cfg, sp, data, Path(args.output), order=args.order, mode=args.mode,
                         **planned_schedule(args, DEFAULT_CODER_PASSES))
    print(f"{args.input}: {info['input_bytes']:,} bytes ({info['escaped_bytes']:,} escaped), "
          f"{info['tokens']:,} tokens -> {args.output}: {info['file_bytes']:,} bytes "
          f"({info['bits_per_byte']:.4f} bits/byte, header {info['header_bytes']} bytes, "
          f"escape section {info['escape_section_bytes']} bytes)", file=sys.stderr)


def cmd_decompress(args: argparse.Namespace) -> None:

    model, cfg, sp = coder_model(args)
    data = decompress_file(model, cfg, sp, Path(args.input))
    write_bytes_atomic(Path(args.output), data)
    print(f"{args.input} -> {args.output}: {len(data):,} bytes", file=sys.stderr)


def cmd_export(args: argparse.Namespace) -> None:

    packed = {"packed": True, "bytes": False, "best": None}[args.layout]
    try:
        report = export_artifact(run_checkpoint(Path(args.run)), Path(args.out), args.quant, args.compressor,
                                 method=args.method, packed=packed, small_numel=args.small_numel,
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

    device = pick_device()
    model, cfg, meta = load_artifact(Path(args.artifact), device)
    tokenizer = Path(args.tokenizer or meta.get("tokenizer") or tokenizer_for(Path(args.data), None))
    byte_table = ByteTable.from_tokenizer(load_tokenizer(tokenizer), cfg.vocab_size)
    results = evaluate(model, load_split(Path(args.data), "val", cfg.vocab_size), byte_table, cfg,
                       steps=args.elbo_steps, num_seqs=args.num_seqs, seed=args.seed, device=device)
    info = write_submission(Path(args.run), Path(args.artifact), Path(args.out), name=args.name,
                            github_id=args.github_id, eval_results=results, size_report=meta,
                            hardware=args.hardware, seeds=[cfg.seed])
    print(json.dumps(info, indent=2))


def cmd_demo(args: argparse.Namespace) -> None:

    run_demo(Path(args.out), steps=args.steps)


def cmd_download(args: argparse.Namespace) -> None:

    out = Path(args.out)
    paths = download(out, args.variant, args.train_shards, repo_id=args.repo_id,
                     remote_root=args.remote_root, progress=not args.quiet)
    tokenizer = next((p for p in paths if p.parent.name == "tokenizers" and p.suffix == ".model"), None)
    print(f"{len(paths)} files under {out}; train with --data {out / 'datasets' / f'fineweb10B_{args.variant}'}"
          + (f" --tokenizer {tokenizer}" if tokenizer else ""))


def cmd_sample(args: argparse.Namespace) -> None:

    device = pick_device()
    if args.artifact:

        model, cfg, meta = load_artifact(Path(args.artifact), device)
    else:

        model, cfg, meta = load_model(run_checkpoint(Path(args.run)), device)
    tokenizer = args.tokenizer or meta.get("tokenizer")
    if not tokenizer:
        raise ValueError("the model records no tokenizer; pass --tokenizer MODEL")
    sp = load_tokenizer(Path(tokenizer))
    result = generate(model, cfg, num=args.num, length=args.length, steps=args.steps, sampler=args.sampler,
                      prompt_ids=sp.encode(args.prompt) if args.prompt else None,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed, device=device)
    for i, (row, text) in enumerate(zip(result.rows, decode_rows(sp, result.rows))):  # the data: stdout
        print(f"--- sample {i} ({len(row) - 1} tokens)")
        print(text)
    print(f"--- {result.generated_tokens} tokens generated in {result.elapsed:.2f}s: "
          f"{result.tokens_per_s:,.1f} tokens/s | {result.nfe} network evaluations for {args.steps} steps "
          f"(per sample {result.row_nfe}) | {result.positions:,} positions | "
          f"{'left-to-right (AR)' if cfg.objective == 'ar' else args.sampler} on {device}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="mdlm-golf", description="Masked diffusion language models for parameter golf.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="tokenize a docs JSONL into challenge-format shards")
    p.add_argument("--docs", required=True, help='JSONL with one {"text": ...} per line')
    p.add_argument("--out", required=True, help="output folder for shards and manifest.json")
    p.add_argument("--tokenizer", help="SentencePiece model; without it, train one in --out")
    p.add_argument("--vocab-size", type=ranged(int, MIN_VOCAB, MAX_VOCAB, high_in=True), default=1024,
                   help="pieces of the tokenizer trained without --tokenizer")
    p.add_argument("--val-docs", type=POSITIVE, default=500, help="the first N documents form the val split")
    p.add_argument("--shard-tokens", type=POSITIVE, default=100_000_000)
    p.add_argument("--overwrite", action="store_true",
                   help="prepare into a folder that is not empty, replacing its shards and manifest.json")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train an MDLM")
    p.add_argument("--data", required=True, help="folder with fineweb_{train,val}_*.bin")
    p.add_argument("--tokenizer", help="SentencePiece model (default: the one in DATA/manifest.json)")
    p.add_argument("--out", help="run folder of a new run")
    p.add_argument("--resume", metavar="RUN", help="continue RUN from RUN/checkpoint.pt")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="seed = the reference configuration (default); record = the 600s wall-clock cap "
                        "at a shape whose export fits 16 MB (9 layers, no adaLN); demo/tiny = CPU sizes")
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    p.add_argument("--overwrite", action="store_true",
                   help="--out may hold a run: delete its model, checkpoint, config, metrics and logs first")
    add_config_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("ablate", help="one run per value x seed of a numeric config field; table and plot")
    p.add_argument("--param", required=True, help="the config field to vary, e.g. num_heads")
    p.add_argument("--values", required=True, help="comma-separated values, e.g. 2,4,8,16,32")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the config's seed)")
    p.add_argument("--data", required=True, help="folder with fineweb_{train,val}_*.bin")
    p.add_argument("--tokenizer", help="SentencePiece model (default: the one in DATA/manifest.json)")
    p.add_argument("--out", required=True, help="folder for runs/, ablation.json, ablation.md, ablation.png; "
                                                "rerun to resume (finished runs are reused)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="base config, as for train")
    add_config_flags(p)
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("race", help="several recipes, AR included, at equal tokens: table and bpb curves")
    p.add_argument("--recipes", default=None,
                   help="comma-separated built-in recipes (default: all of them: today, ar, muon, "
                        "no-time-cond, ema, anchor, best)")
    p.add_argument("--recipe", action="append", metavar="NAME:FIELD=VALUE,...",
                   help="a recipe of your own (repeatable), e.g. wide:model_dim=192,num_heads=3")
    p.add_argument("--seeds", default="1,2", help="comma-separated seeds (default 1,2)")
    p.add_argument("--data", required=True, help="folder with fineweb_{train,val}_*.bin")
    p.add_argument("--tokenizer", help="SentencePiece model (default: the one in DATA/manifest.json)")
    p.add_argument("--out", required=True, help="folder for runs/, race.json, race.md, race.png; rerun to resume")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="base config, as for train")
    add_config_flags(p)
    p.set_defaults(func=cmd_race)

    p = sub.add_parser("eval", help="bits per byte of a trained run on the val split (ELBO, or exact for AR)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", "--run-dir", dest="run",
                        help="run folder (holds model.pt); spell it --run-dir under torchrun, whose own "
                             "--run-path swallows --run")
    source.add_argument("--artifact", help="a quantized artifact written by `export` (what the entry ships)")
    p.add_argument("--data", required=True, help="folder with fineweb_val_*.bin")
    p.add_argument("--tokenizer", help="SentencePiece model (default: the one the run trained with)")
    p.add_argument("--elbo-steps", type=POSITIVE, default=None,
                   help="ELBO steps T (default: the run's own elbo_steps, as its training-time eval)")
    p.add_argument("--num-seqs", type=COUNT, default=None,
                   help="val slices to evaluate; 0 = the whole split (default: the run's eval_num_seqs)")
    p.add_argument("--mode", choices=("strict", "anchored", "both"), default="both")
    p.add_argument("--seed", type=SEED, default=None, help="seeds the mask draws (default: the run's seed)")
    p.add_argument("--draws", type=POSITIVE, default=1,
                   help="independent mask draws per slice: reports their mean and standard error")
    p.add_argument("--grid", choices=GRIDS, default="linear", help="time grid of the T steps")
    p.add_argument("--batch-rows", type=POSITIVE, default=None,
                   help="(slice, step) rows per forward (default: the run's eval_batch_rows)")
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--method", choices=("elbo", "planned"), default="elbo",
                   help="elbo: the T-step ELBO upper bound; planned: the exact code length of "
                        "planned-order decoding (--order, --passes / --tokens-per-pass)")
    add_planned_flags(p, DEFAULT_EVAL_PASSES)
    p.set_defaults(func=cmd_eval)

    for name, func, helptext in [
            ("compress", cmd_compress, "compress a UTF-8 text file with a run's model (MDZ1 file)"),
            ("decompress", cmd_decompress, "rebuild the text of an MDZ1 file with the same run")]:
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--run", required=True, help="run folder (holds model.pt)")
        p.add_argument("--tokenizer", help="SentencePiece model (default: the one the run trained with)")
        p.add_argument("input", help="text file" if name == "compress" else "MDZ1 file")
        p.add_argument("output", help="MDZ1 file to write" if name == "compress" else "text file to write")
        if name == "compress":
            add_planned_flags(p, DEFAULT_CODER_PASSES)
            p.add_argument("--mode", choices=("anchored", "strict"), default="anchored",
                           help="anchored: BOS positions are given in the header, not coded; strict: all coded")
        p.set_defaults(func=func)

    p = sub.add_parser("export", help="quantize and compress a run into the artifact the 16 MB rule counts")
    p.add_argument("--run", required=True, help="run folder (holds model.pt)")
    p.add_argument("--out", required=True, help="artifact file to write")
    p.add_argument("--quant", default="auto",
                   help="auto (default: the most precise spec that fits with >= 100 KB to spare), or a "
                        "format per group: 'int6' or 'embed=int8,attn=int6,mlp=int6,head=int8,adaln=int8' "
                        "(groups embed attn mlp head adaln; formats int8 int6 int5 int4 fp16)")
    p.add_argument("--compressor", choices=("zlib", "lzma", "zstd", "brotli", "best"), default="best",
                   help="best = try each installed one and keep the smallest")
    p.add_argument("--layout", choices=("packed", "bytes", "best"), default="best",
                   help="sub-byte codes bit-packed, one per byte (entropy coders often prefer it), or both")
    p.add_argument("--method", choices=("rtn", "gptq"), default="rtn",
                   help="rtn = clip search + rounding; gptq = error-compensated rounding (needs --data)")
    p.add_argument("--data", help="folder with fineweb_train_*.bin for GPTQ calibration")
    p.add_argument("--small-numel", type=COUNT, default=65_536, help="tensors under this many values stay fp16")
    p.add_argument("--allow-oversize", action="store_true",
                   help="write the artifact even if code + artifact exceed 16,000,000 bytes")
    p.add_argument("--json", help="write the size report as JSON here")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("submission", help="write a challenge record folder from a run and its artifact")
    p.add_argument("--run", required=True, help="run folder (config.json, train.log)")
    p.add_argument("--artifact", required=True, help="artifact written by export")
    p.add_argument("--data", required=True, help="folder with fineweb_val_*.bin (the artifact is scored)")
    p.add_argument("--tokenizer", help="SentencePiece model (default: the one the run trained with)")
    p.add_argument("--out", required=True, help="records/DATE_NAME/")
    p.add_argument("--name", required=True)
    p.add_argument("--github-id", required=True)
    p.add_argument("--hardware", default="8xH100 SXM")
    p.add_argument("--elbo-steps", type=POSITIVE, default=128)
    p.add_argument("--num-seqs", type=COUNT, default=0, help="val slices; 0 = the whole split")
    p.add_argument("--seed", type=SEED, default=0)
    p.set_defaults(func=cmd_submission)

    p = sub.add_parser("download", help="fetch the challenge's published FineWeb shards and tokenizer (HF Hub)")
    p.add_argument("--variant", default="sp1024", help="tokenizer family: dataset fineweb10B_<VARIANT>")
    p.add_argument("--train-shards", type=COUNT, default=80,
                   help="first N train shards (~200 MB each; default 80 as in the challenge); all val shards always")
    p.add_argument("--out", default="data", help="root of the challenge layout: datasets/, tokenizers/, manifest.json")
    p.add_argument("--repo-id", default=None,
                   help="HF dataset repo (default $MATCHED_FINEWEB_REPO_ID or willdepueoai/parameter-golf)")
    p.add_argument("--remote-root", default=None,
                   help="export folder inside the repo (default $MATCHED_FINEWEB_REMOTE_ROOT_PREFIX or datasets)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("demo", help="end to end on stdlib text in a few CPU minutes; no download")
    p.add_argument("--out", default="demo_run", help="folder for the demo's data and run")
    p.add_argument("--steps", type=POSITIVE, default=None, help="training steps (default: the demo preset's)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("sample", help="generate text from a trained run or an exported artifact")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run folder (holds model.pt)")
    source.add_argument("--artifact", help="compressed artifact written by export")
    p.add_argument("--tokenizer", help="SentencePiece model (default: the one the model trained with)")
    p.add_argument("--prompt", default=None, help="text every sample continues (kept verbatim after BOS)")
    p.add_argument("--length", type=ranged(int, 2), default=256,
                   help="tokens per sample, BOS included (<= seq_len)")
    p.add_argument("--steps", type=POSITIVE, default=128, help="denoising steps T on the training schedule")
    p.add_argument("--sampler", choices=("ancestral", "cached", "confidence"), default="ancestral",
                   help="ancestral: network every step; cached: same samples, network only at steps "
                        "that reveal a token; confidence: reveal the most probable positions first")
    p.add_argument("--temperature", type=ranged(float, 0, low_in=False), default=1.0)
    p.add_argument("--top-p", type=ranged(float, 0, 1, low_in=False, high_in=True), default=1.0,
                   help="nucleus filtering; a tiny value is greedy")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--num", type=POSITIVE, default=1, help="samples, generated as one batch")
    p.set_defaults(func=cmd_sample)
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


def main(argv: list[str] | None = None) -> int:
    """Run one command; every expected failure is one line `mdlm-golf CMD: error: ...` and exit 2."""

    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    clean = False
    try:
        args.func(args)
        clean = True
    except BrokenPipeError:  # stdout piped into `head`: stop quietly, and let no flush at exit complain
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # a stdout without a descriptor (captured) has nothing to flush
            pass
        return 1
    except (ValueError, FloatingPointError) as e:  # DataError, CheckpointError, ... are ValueErrors
        print(f"mdlm-golf {args.command}: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # a missing folder, a directory in the way, a full disk, no permission
        print(f"mdlm-golf {args.command}: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mdlm-golf {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        shutdown(clean)  # leave the torchrun process group cleanly, or a rank can abort at exit
    return 0
