"""A challenge record folder: a standalone single-file train_mdlm.py generated from this package, README,
submission.json and the training log."""
from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

from .eval import headline
from .files import write_text_atomic

PACKAGE = Path(__file__).resolve().parent
# the modules the standalone script needs, in dependency order (no CLI, no download, no demo)
SCRIPT_MODULES = ("files", "config", "data.shards", "model", "diffusion", "objective", "dist", "data.loader",
                  "checkpoint", "eval.elbo", "train.optim", "train.loop", "artifact.export")
SCRIPT_NAME = "train_mdlm.py"

SCRIPT_MAIN = '''
def _env_path(name, default):
    return Path(os.environ.get(name, default))


def main():
    """Train, export the quantized artifact, evaluate its round trip; the challenge's env vars set everything."""
    cfg = build_config(os.environ.get("PRESET") or None)
    data = _env_path("DATA_PATH", "./data/datasets/fineweb10B_sp1024")
    tokenizer = _env_path("TOKENIZER_PATH", "./data/tokenizers/fineweb_1024_bpe.model")
    run = _env_path("RUN_DIR", "./run")
    artifact = run / "final_model.mdlm"
    train(cfg, data, run, tokenizer, run_eval=False)
    env = init_distributed()
    if env.is_main:
        report = export_artifact(run / "model.pt", artifact, os.environ.get("QUANT", "int8"),
                                 os.environ.get("COMPRESSOR", "lzma"), code_paths=[Path(__file__)])
        print(format_size_table(report))
    barrier()
    model, cfg, _ = load_artifact(artifact, env.device)
    byte_table = ByteTable.from_tokenizer(load_tokenizer(tokenizer), cfg.vocab_size)
    val = load_split(data, "val", cfg.vocab_size)
    results = evaluate(model, val, byte_table, cfg, steps=cfg.elbo_steps, num_seqs=cfg.eval_num_seqs,
                       seed=cfg.seed, device=env.device)
    if env.is_main:
        for r in results.values():
            print("final_artifact " + format_result(r))
        write_text_atomic(run / "eval_artifact.json", json.dumps(results, indent=2) + "\\n")
    shutdown()


if __name__ == "__main__":
    main()
'''


class SubmissionError(ValueError):
    """The record folder cannot be written; the message is one line."""


class _DropRelativeImports(ast.NodeTransformer):
    """In one file the package's names are plain globals: drop `from .x import y` wherever it stands."""

    def __init__(self, name: str, included: tuple[str, ...]):
        self.name, self.included = name, included

    def visit_ImportFrom(self, node: ast.ImportFrom):
        if not node.level:
            return node
        package = self.name.split(".")[:-1]
        target = ".".join(package[:len(package) - node.level + 1] + [node.module or ""])
        # a stage package (`from ..data import x`) re-exports names of its modules
        if not any(m == target or m.startswith(target + ".") for m in self.included):
            raise SubmissionError(f"{module_path(self.name)}:{node.lineno}: imports {target}, which the "
                                  f"standalone script does not include")
        return None if node in self.top else ast.Pass()

    def visit_Module(self, node: ast.Module):
        self.top = node.body
        return self.generic_visit(node)


def module_path(name: str) -> str:
    """data.shards -> data/shards.py"""
    return name.replace(".", "/") + ".py"


def module_body(name: str, included: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(absolute import lines, body source) of one package module, its relative imports dropped."""
    path = PACKAGE / module_path(name)
    tree = _DropRelativeImports(name, included).visit(ast.parse(path.read_text(encoding="utf-8")))
    imports, body = [], []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            continue  # stated once at the top of the file
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.append(ast.unparse(node))
        elif not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):
            body.append(ast.unparse(node))  # the module docstring is dropped
    return imports, body


def top_level_names(source: str) -> set[str]:
    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def build_script(modules: tuple[str, ...] = SCRIPT_MODULES) -> str:
    """The package's modules concatenated into one standalone file (torch, numpy, sentencepiece only)."""
    imports: list[str] = []
    parts, owner = [], {}
    for name in modules:
        module_imports, body = module_body(name, modules)
        imports += [line for line in module_imports if line not in imports]
        source = "\n\n".join(body)
        for symbol in top_level_names(source):
            if symbol in owner:
                raise SubmissionError(f"{module_path(name)} and {module_path(owner[symbol])} both define "
                                      f"{symbol!r}")
            owner[symbol] = name
        parts.append(f"# ---- {module_path(name)}\n{source}")
    header = ('"""MDLM for parameter golf: standalone train + quantize + evaluate, generated by mdlm-golf."""\n'
              "from __future__ import annotations\n")
    script = header + "\n".join(imports) + "\n\n" + "\n\n\n".join(parts) + "\n\n" + SCRIPT_MAIN
    ast.parse(script)  # fail here, not on the record machine
    return script


def write_submission(run_dir: Path, artifact_path: Path, out_dir: Path, *, name: str, github_id: str,
                     eval_results: dict, size_report: dict, hardware: str, seeds: list[int]) -> dict:
    """Write OUT/{train_mdlm.py, README.md, submission.json, train logs}; returns submission.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    script = build_script()
    write_text_atomic(out_dir / SCRIPT_NAME, script)
    code = len(script.encode("utf-8"))
    model_bytes = Path(artifact_path).stat().st_size
    main = headline(eval_results)  # strict ELBO bound for an MDLM, the exact chain rule for AR
    info = {
        "name": name, "github_id": github_id, "val_bpb": main["bpb"],
        "metric": (f"{main['mode']} bits per byte: {main['bound']}, {main['num_seqs']} val slices x "
                   f"{main['seq_len']} tokens ({main['tokens']:,} tokens, {main['bytes']:,} bytes), "
                   f"evaluated on the decompressed artifact"),
        "val_bpb_anchored": eval_results.get("anchored", {}).get("bpb"),
        "bytes_total": code + model_bytes, "bytes_code": code, "bytes_model": model_bytes,
        "hardware": hardware, "seeds": seeds, "quant": size_report.get("spec"),
        "compressor": size_report.get("compressor"),
    }
    write_text_atomic(out_dir / "submission.json", json.dumps(info, indent=2) + "\n")
    write_text_atomic(out_dir / "README.md", record_readme(info, json.loads((run_dir / "config.json").read_text()),
                                                        eval_results))
    for log in sorted(Path(run_dir).glob("*.log")):
        shutil.copyfile(log, out_dir / log.name)
    return info


def model_description(config: dict) -> str:
    """What was trained, from the run's config."""
    if config.get("objective") == "ar":
        return ("An autoregressive transformer (RoPE, QK-norm, ReLU^2 MLP, causal attention) trained with "
                "next-token cross-entropy")
    conditioning = " and adaLN conditioning on the noise level" if config.get("time_cond", True) else ""
    return (f"A masked diffusion language model (MDLM): bidirectional transformer with RoPE, QK-norm, ReLU^2 "
            f"MLP{conditioning}, trained with the continuous-time MDLM ELBO (log-linear schedule, SUBS "
            f"parameterization, antithetic times)")


def record_readme(info: dict, config: dict, results: dict) -> str:
    rows = "\n".join(f"| {mode} | {r['bpb']:.4f} | {r['bits_per_token']:.4f} | {r.get('elbo_steps', 'exact')} | "
                     f"{r['num_seqs']} x {r['seq_len']} | {r['tokens']:,} | {r['bytes']:,} |"
                     for mode, r in results.items())
    fields = ", ".join(f"{k}={v}" for k, v in config.items())
    return f"""# {info['name']}

{model_description(config)}, quantized to `{info['quant']}` and compressed with
`{info['compressor']}`. `{SCRIPT_NAME}` is generated from the mdlm-golf package and needs only torch,
numpy and sentencepiece; the challenge's environment variables (`NUM_LAYERS=...`) set its config.

## Metric
Bits per byte with the challenge evaluator's exact byte count. A diffusion model's ELBO is an **upper
bound** on its code length: `strict` masks and scores every token (BOS included) and bounds the whole
stream; `anchored` is given the BOS positions. Both are measured on the decompressed artifact.

| mode | bpb | bits/token | ELBO steps | slices | tokens | bytes |
| --- | --- | --- | --- | --- | --- | --- |
{rows}

## Size
code {info['bytes_code']:,} + model {info['bytes_model']:,} = {info['bytes_total']:,} bytes (limit 16,000,000).

## Config
{fields}

Hardware: {info['hardware']}. Seeds: {info['seeds']}.
"""
