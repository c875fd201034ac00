"""The command line's flags: one parser builder per subcommand, flag types and the helpers that read flags.

cli.py binds each subcommand to its cmd_* function; nothing here runs a command.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable

from .config import (MAX_SEED, MAX_SEQ_LEN, MAX_VOCAB, PRESETS, check_field, describe_range, field_types,
                     in_range, parse_value)
from .data import MIN_VOCAB
from .diffusion import GRIDS
from .eval import ORDERS
from .experiments import EQUALS, RECIPES, YARDSTICK
from .sampling import MAX_SAMPLES

DEFAULT_EVAL_PASSES = 128
DEFAULT_CODER_PASSES = 64
DATA_HELP = "folder with fineweb_{train,val}_*.bin"
MANIFEST_TOKENIZER_HELP = "SentencePiece model (default: the one in DATA/manifest.json)"
RUN_TOKENIZER_HELP = "SentencePiece model (default: the one the run trained with)"

Subparsers = argparse._SubParsersAction  # what add_subparsers returns; each add_* adds one subcommand to it


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


def text(raw: str) -> str:
    """An argparse type= for free text (a prompt, a name): UTF-8, as a shell may hand over any bytes."""
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("is not valid UTF-8 text") from None
    return raw


OVERWRITE_HELP = "replace the output if it exists (never a file the command reads)"
POSITIVE = ranged(int, 1)
COUNT = ranged(int, 0)  # 0 allowed: "none" or "all", as each flag's help says
SEED = ranged(int, 0, MAX_SEED, high_in=True)


# ---------------------------------------------------------------- flag groups and their readers

def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One --kebab-case flag per Config field (default None: unset flags leave env/preset alone)."""
    group = parser.add_argument_group("config fields (also settable as UPPER_CASE env vars)")
    for name, kind in field_types().items():
        group.add_argument(f"--{name.replace('_', '-')}", dest=name, type=str, default=None,
                           metavar=kind.__name__.upper())


def config_overrides(args: argparse.Namespace) -> dict:
    """The Config fields set by flags, parsed to their types."""
    return {name: parse_value(name, getattr(args, name))
            for name in field_types() if getattr(args, name, None) is not None}


def parse_seeds(text: str) -> list[int]:
    """Comma-separated seeds, each a valid Config.seed."""
    seeds = [parse_value("seed", s) for s in text.split(",")]
    for seed in seeds:
        check_field("seed", seed, int)
    return seeds


def add_planned_flags(p: argparse.ArgumentParser, default_passes: int) -> None:
    """--order and one of --passes / --tokens-per-pass: the planned-order decoding schedule."""
    p.add_argument("--order", choices=ORDERS, default=None,
                   help="which masked positions each pass reveals: the leftmost, or those the model is "
                        "surest of (highest probability, or largest top1-top2 margin); default confidence "
                        "(an AR model: left-to-right, one token per pass)")
    schedule = p.add_mutually_exclusive_group()
    schedule.add_argument("--passes", type=POSITIVE, default=None,
                          help=f"network evaluations per slice, spread evenly (default {default_passes}); "
                               "P = seq_len with left-to-right is the chain rule")
    schedule.add_argument("--tokens-per-pass", type=POSITIVE, default=None,
                          help="reveal m tokens per pass instead")


def planned_schedule(args: argparse.Namespace, default_passes: int) -> dict:
    """--tokens-per-pass m or --passes P (default P) as evaluate_planned / compress_file keywords."""
    if args.tokens_per_pass is not None:
        return {"tokens_per_pass": args.tokens_per_pass}
    return {"passes": args.passes if args.passes is not None else default_passes}


# ---------------------------------------------------------------- one builder per subcommand

def new_parser() -> tuple[argparse.ArgumentParser, Subparsers]:
    """The top-level parser and its subcommand collection (subparsers inherit the one-line errors)."""
    parser = Parser(
        prog="mdlm-golf", description="Masked diffusion language models for parameter golf.")
    return parser, parser.add_subparsers(dest="command", required=True)


def add_prepare(sub: Subparsers) -> argparse.ArgumentParser:
    """prepare: docs JSONL -> shards."""
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
    return p


def add_train(sub: Subparsers) -> argparse.ArgumentParser:
    """train: a new run or a resumed one."""
    p = sub.add_parser("train", help="train an MDLM")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--tokenizer", help=MANIFEST_TOKENIZER_HELP)
    p.add_argument("--out", help="run folder of a new run")
    p.add_argument("--resume", metavar="RUN", help="continue RUN from RUN/checkpoint.pt")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="seed = the reference configuration (default); record = the 600s wall-clock cap "
                        "at a shape whose export fits 16 MB (9 layers, no adaLN); demo/tiny = CPU sizes")
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    p.add_argument("--overwrite", action="store_true",
                   help="--out may hold a run: delete its model, checkpoint, config, metrics and logs first")
    add_config_flags(p)
    return p


def add_ablate(sub: Subparsers) -> argparse.ArgumentParser:
    """ablate: a sweep of one config field."""
    p = sub.add_parser("ablate", help="one run per value x seed of a numeric config field; table and plot")
    p.add_argument("--param", required=True, type=text, help="the config field to vary, e.g. num_heads")
    p.add_argument("--values", required=True, type=text, help="comma-separated values, e.g. 2,4,8,16,32")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the config's seed)")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--tokenizer", help=MANIFEST_TOKENIZER_HELP)
    p.add_argument("--out", required=True, help="folder for runs/, ablation.json, ablation.md, ablation.png; "
                                                "rerun to resume (finished runs are reused)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="base config, as for train")
    add_config_flags(p)
    return p


def add_race(sub: Subparsers) -> argparse.ArgumentParser:
    """race: recipes against each other at equal tokens, FLOPs or seconds."""
    p = sub.add_parser("race", help="several recipes, AR included, at equal tokens, FLOPs or seconds: table and "
                                    "bpb curves")
    p.add_argument("--equal", choices=EQUALS, default="tokens",
                   help=f"what every run gets as much of as the yardstick ({YARDSTICK}) in --steps steps: tokens "
                        "(default: the same steps), training FLOPs (fewer steps for a costlier model) or "
                        "training seconds (a quiet machine's; the yardstick trains first)")
    p.add_argument("--recipes", default=None, type=text,
                   help=f"comma-separated built-in recipes (default: all of them: {', '.join(RECIPES)})")
    p.add_argument("--recipe", action="append", type=text, metavar="NAME:FIELD=VALUE,...",
                   help="a recipe of your own (repeatable), e.g. wide:model_dim=192,num_heads=3")
    p.add_argument("--seeds", default="1,2", help="comma-separated seeds (default 1,2)")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--tokenizer", help=MANIFEST_TOKENIZER_HELP)
    p.add_argument("--out", required=True, help="folder for runs/, race.json, race.md, race.png; rerun to resume")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="base config, as for train")
    add_config_flags(p)
    return p


def add_eval(sub: Subparsers) -> argparse.ArgumentParser:
    """eval: bits per byte of a run or an artifact (ELBO or planned order)."""
    p = sub.add_parser("eval", help="bits per byte of a trained run on the val split (ELBO, or exact for AR)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", "--run-dir", dest="run",
                        help="run folder (holds model.pt); spell it --run-dir under torchrun, whose own "
                             "--run-path swallows --run")
    source.add_argument("--artifact", help="a quantized artifact written by `export` (what the entry ships)")
    p.add_argument("--data", required=True, help="folder with fineweb_val_*.bin")
    p.add_argument("--tokenizer", help=RUN_TOKENIZER_HELP)
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
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--method", choices=("elbo", "planned"), default="elbo",
                   help="elbo: the T-step ELBO upper bound; planned: the exact code length of "
                        "planned-order decoding (--order, --passes / --tokens-per-pass)")
    add_planned_flags(p, DEFAULT_EVAL_PASSES)
    return p


def add_coder_command(sub: Subparsers, name: str, helptext: str, input_help: str,
                      output_help: str) -> argparse.ArgumentParser:
    """The flags compress and decompress share: the run, its tokenizer, input and output files."""
    p = sub.add_parser(name, help=helptext)
    p.add_argument("--run", required=True, help="run folder (holds model.pt)")
    p.add_argument("--tokenizer", help=RUN_TOKENIZER_HELP)
    p.add_argument("input", help=input_help)
    p.add_argument("output", help=output_help)
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    return p


def add_compress(sub: Subparsers) -> argparse.ArgumentParser:
    """compress: a file -> an MDZ1 file."""
    p = add_coder_command(sub, "compress", "compress a UTF-8 text file with a run's model (MDZ1 file)",
                          "text file", "MDZ1 file to write")
    add_planned_flags(p, DEFAULT_CODER_PASSES)
    p.add_argument("--mode", choices=("anchored", "strict"), default="anchored",
                   help="anchored: BOS positions are given in the header, not coded; strict: all coded")
    return p


def add_decompress(sub: Subparsers) -> argparse.ArgumentParser:
    """decompress: an MDZ1 file -> the original file."""
    return add_coder_command(sub, "decompress", "rebuild the text of an MDZ1 file with the same run",
                             "MDZ1 file", "text file to write")


def add_export(sub: Subparsers) -> argparse.ArgumentParser:
    """export: a run -> the quantized, compressed artifact."""
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
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    return p


def add_submission(sub: Subparsers) -> argparse.ArgumentParser:
    """submission: a challenge record folder."""
    p = sub.add_parser("submission", help="write a challenge record folder from a run and its artifact")
    p.add_argument("--run", required=True, help="run folder (config.json, train.log)")
    p.add_argument("--artifact", required=True, help="artifact written by export")
    p.add_argument("--data", required=True, help="folder with fineweb_val_*.bin (the artifact is scored)")
    p.add_argument("--tokenizer", help=RUN_TOKENIZER_HELP)
    p.add_argument("--out", required=True, help="records/DATE_NAME/ (written whole, or not at all)")
    p.add_argument("--overwrite", action="store_true", help="replace an --out folder that holds files")
    p.add_argument("--name", required=True, type=text)
    p.add_argument("--github-id", required=True, type=text)
    p.add_argument("--hardware", default="8xH100 SXM", type=text)
    p.add_argument("--elbo-steps", type=POSITIVE, default=128)
    p.add_argument("--num-seqs", type=COUNT, default=0, help="val slices; 0 = the whole split")
    p.add_argument("--seed", type=SEED, default=0)
    return p


def add_download(sub: Subparsers) -> argparse.ArgumentParser:
    """download: the challenge's shards and tokenizer."""
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
    return p


def add_demo(sub: Subparsers) -> argparse.ArgumentParser:
    """demo: end to end on CPU."""
    p = sub.add_parser("demo", help="end to end on stdlib text in a few CPU minutes; no download")
    p.add_argument("--out", default="demo_run", help="folder for the demo's data and run")
    p.add_argument("--steps", type=POSITIVE, default=None, help="training steps (default: the demo preset's)")
    return p


def add_sample(sub: Subparsers) -> argparse.ArgumentParser:
    """sample: text from a run or an artifact."""
    p = sub.add_parser("sample", help="generate text from a trained run or an exported artifact")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run folder (holds model.pt)")
    source.add_argument("--artifact", help="compressed artifact written by export")
    p.add_argument("--tokenizer", help="SentencePiece model (default: the one the model trained with)")
    p.add_argument("--prompt", default=None, type=text, help="text every sample continues (kept verbatim after BOS)")
    p.add_argument("--length", type=ranged(int, 2, MAX_SEQ_LEN, high_in=True), default=256,
                   help="tokens per sample, BOS included (<= seq_len)")
    p.add_argument("--steps", type=POSITIVE, default=128, help="denoising steps T on the training schedule")
    p.add_argument("--sampler", choices=("ancestral", "cached", "confidence"), default="ancestral",
                   help="ancestral: network every step; cached: same samples, network only at steps "
                        "that reveal a token; confidence: reveal the most probable positions first")
    p.add_argument("--temperature", type=ranged(float, 0, low_in=False), default=1.0)
    p.add_argument("--top-p", type=ranged(float, 0, 1, low_in=False, high_in=True), default=1.0,
                   help="nucleus filtering; a tiny value is greedy")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--num", type=ranged(int, 1, MAX_SAMPLES, high_in=True), default=1,
                   help="samples, generated as one batch")
    return p
