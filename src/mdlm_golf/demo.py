"""The demo: a corpus from text every CPython ships, its own tokenizer, a small model, exact bpb."""
from __future__ import annotations

import ast
import json
import os
import random
import sysconfig
import time
from pathlib import Path
from typing import Iterator

from .checkpoint import load_model, run_checkpoint
from .config import build_config
from .data import load_tokenizer, prepare, read_manifest
from .files import write_png, write_text_atomic
from .objective import loss_name
from .sampling import decode_rows, generate
from .train import train

MIN_DOC_CHARS = 80
VAL_DOCS = 400  # shorter docstrings ("Return x.") teach little and bloat the BOS count
SAMPLES, SAMPLE_LENGTH, SAMPLE_STEPS, SAMPLE_SEED = 2, 48, 32, 0  # what the demo shows of its model


def pydoc_topics() -> Iterator[str]:
    """The language reference sections pydoc shows for `help('TOPIC')`."""
    from pydoc_data.topics import topics

    yield from (text for _, text in sorted(topics.items()))


def stdlib_sources() -> list[Path]:
    """The stdlib's .py files, without tests and installed third-party packages."""
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    paths = []
    for folder, subfolders, files in os.walk(sysconfig.get_paths()["stdlib"]):
        subfolders[:] = sorted(d for d in subfolders if d not in skip)
        paths += [Path(folder) / f for f in sorted(files) if f.endswith(".py")]
    return paths


def stdlib_docstrings(min_chars: int = MIN_DOC_CHARS) -> Iterator[str]:
    """Module, class and function docstrings of the stdlib sources, read with ast (nothing imported)."""
    for path in stdlib_sources():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue  # a few stdlib files are deliberately broken or non-UTF-8
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    yield doc


def build_corpus(path: Path) -> dict:
    """Write the demo corpus as {"text": ...} lines; returns document and character counts."""
    docs = [*pydoc_topics(), *stdlib_docstrings()]
    random.Random(1337).shuffle(docs)  # mix long reference topics and docstrings into both splits
    text = "".join(json.dumps({"text": d}) + "\n" for d in docs)
    write_text_atomic(path, text)
    return {"docs": len(docs), "chars": sum(map(len, docs))}


def demo_samples(run_dir: Path, tokenizer: Path) -> list[str]:
    """SAMPLES seeded samples of the run's model: what its strict bpb reads like."""
    model, cfg, _ = load_model(run_checkpoint(run_dir), "cpu")
    result = generate(model, cfg, num=SAMPLES, length=SAMPLE_LENGTH, steps=SAMPLE_STEPS, seed=SAMPLE_SEED)
    return decode_rows(load_tokenizer(tokenizer), result.rows)


def plot_loss(metrics_path: Path, png_path: Path) -> None:
    """The run's logged training loss against steps, as a PNG."""
    import matplotlib  # imported here: a heavy import only the figure needs

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    try:
        ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], marker=".", lw=1.2)
        ax.set(xlabel="step", ylabel="training loss (nats per scored token)", title="mdlm-golf demo")
        ax.grid(alpha=0.3)
        write_png(fig, png_path, dpi=100)
    finally:
        plt.close(fig)


def run_demo(out: Path, steps: int | None = None, **overrides) -> dict:
    """Corpus -> SP-1024 tokenizer -> shards -> train the demo preset -> strict/anchored bpb, two samples
    and a loss curve."""
    began = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    data_dir, corpus = out / "data", out / "stdlib_docs.jsonl"
    manifest = read_manifest(data_dir)
    if manifest is not None:
        print(f"reusing prepared data in {data_dir}")
    else:
        counts = build_corpus(corpus)
        print(f"corpus: {counts['docs']:,} documents, {counts['chars']:,} characters of stdlib text")
        print("training a SentencePiece BPE (1024) and writing shards ...")
        # no manifest: an interrupted prepare left the folder, if anything
        manifest = prepare(corpus, data_dir, None, vocab_size=1024, val_docs=VAL_DOCS, overwrite=True)
    cfg = build_config("demo", environ={}, overrides={"steps": steps, **overrides})
    # the demo's own run: a rerun replaces it
    run_dir, tokenizer = out / "run", Path(manifest["tokenizer"])
    summary = train(cfg, data_dir, run_dir, tokenizer, replace=True)
    samples = demo_samples(run_dir, tokenizer)
    plot_loss(run_dir / "metrics.jsonl", out / "loss.png")
    strict, anchored = summary["eval"]["strict"], summary["eval"]["anchored"]
    losses = summary["losses"]
    lines = [
        "== mdlm-golf demo ==",
        f"data      {manifest['train']['tokens']:,} train / {manifest['val']['tokens']:,} val tokens "
        f"({manifest['train']['docs']:,} / {manifest['val']['docs']:,} documents), SP-1024 trained here",
        f"model     {summary['num_params']:,} parameters, {summary['steps']} steps in "
        f"{summary['train_seconds']:.0f}s",
        f"loss      {losses[0]:.3f} -> {losses[-1]:.3f} nats per scored token ({loss_name(cfg)}); "
        f"curve {out / 'loss.png'}",
        f"strict    {strict['bpb']:.4f} bpb  ({strict['elbo_steps']}-step ELBO upper bound, "
        f"{strict['tokens']:,} tokens, {strict['bytes']:,} bytes, {strict['bytes_per_token']:.3f} bytes/token)",
        f"anchored  {anchored['bpb']:.4f} bpb  (same, BOS given)",
        f"uniform   {10 / strict['bytes_per_token']:.4f} bpb  (log2(1024) bits per token: the untrained model)",
        *(f"sample {i}  {text[:200]!r}" for i, text in enumerate(samples)),
        f"          ({SAMPLE_LENGTH} tokens at most, {SAMPLE_STEPS} denoising steps, seed {SAMPLE_SEED}: "
        f"mdlm-golf sample --run {run_dir} --num {SAMPLES} --length {SAMPLE_LENGTH} --steps {SAMPLE_STEPS})",
        f"time      {time.perf_counter() - began:.0f}s total; run folder {run_dir}",
    ]
    print("\n".join(lines))
    return summary
