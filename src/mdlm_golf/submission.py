"""A challenge record folder: a standalone single-file train_mdlm.py generated from this package, README,
submission.json and the training log."""
from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

from .eval import headline
from .files import atomic_folder, read_json_object

PACKAGE = Path(__file__).resolve().parent
SCRIPT_NAME = "train_mdlm.py"
# What SCRIPT_MAIN calls, imported as a package module would: the script holds these names' modules and,
# following their relative imports, every module those need, so new modules of a stage come along.
SCRIPT_IMPORTS = """
from .artifact import export_artifact, format_size_table, load_artifact
from .config import build_config
from .data import ByteTable, load_split, load_tokenizer
from .dist import barrier, init_distributed, shutdown
from .eval import HEADLINE_MODES, evaluate, format_result, plan_elbo_steps
from .files import atomic_folder, read_json_object
from .train import train
"""
MAIN_STDLIB = ("import json", "import os", "import time", "from pathlib import Path")  # SCRIPT_MAIN's own imports
# A module named so (any dotted part) never goes into the script: the CLI, downloads, the demo, this writer.
EXCLUDED_PARTS = frozenset({"__main__", "cli", "demo", "download", "submission"})
ROOT = "__script__"  # SCRIPT_IMPORTS' importer: a module at the package root

SCRIPT_MAIN = '''
def _env_path(name, default):
    return Path(os.environ.get(name, default))


def _score(artifact, tokenizer, data, env):
    """The artifact's headline figure on the val split, its ELBO steps fitted to the evaluation budget
    by a timed probe: the projection is printed before the evaluation, the measured time after."""
    model, cfg, _ = load_artifact(artifact, env.device)
    byte_table = ByteTable.from_tokenizer(load_tokenizer(tokenizer), cfg.vocab_size)
    val = load_split(data, "val", cfg.vocab_size)
    plan = plan_elbo_steps(model, val, byte_table, cfg, env.device)
    if env.is_main:
        print(plan.describe(val.size), flush=True)
    began = time.perf_counter()
    results = evaluate(model, val, byte_table, cfg, steps=plan.steps, num_seqs=cfg.eval_num_seqs, seed=cfg.seed,
                       modes=HEADLINE_MODES, device=env.device)
    if env.is_main:
        print(f"eval took {time.perf_counter() - began:.0f}s on {plan.processes} process(es) "
              f"(projected ~{plan.projected_seconds:.0f}s)")
    return results


def main():
    """Train, export the quantized artifact, evaluate its round trip; the challenge's env vars set everything."""
    cfg = build_config(os.environ.get("PRESET") or None)
    data = _env_path("DATA_PATH", "./data/datasets/fineweb10B_sp1024")
    tokenizer = _env_path("TOKENIZER_PATH", "./data/tokenizers/fineweb_1024_bpe.model")
    run = _env_path("RUN_DIR", "./run")
    artifact = run / "final_model.mdlm"
    env = init_distributed()  # opened here, so training leaves the process group to the evaluation
    train(cfg, data, run, tokenizer, run_eval=False)
    if env.is_main:
        report = export_artifact(run / "model.pt", artifact, os.environ.get("QUANT", "int8"),
                                 os.environ.get("COMPRESSOR", "lzma"),
                                 code_bytes=Path(__file__).stat().st_size)  # this file: the code counted
        print(format_size_table(report))
    barrier()
    results = _score(artifact, tokenizer, data, env)
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


def module_path(name: str) -> str:
    """data.shards -> data/shards.py"""
    return name.replace(".", "/") + ".py"


def is_module(name: str) -> bool:
    """Whether the dotted name is a module file of the package (not a stage package)."""
    return bool(name) and (PACKAGE / module_path(name)).is_file()


def is_stage(name: str) -> bool:
    """Whether the dotted name is a package folder (a stage) of the package."""
    return bool(name) and (PACKAGE / name.replace(".", "/") / "__init__.py").is_file()


def parse_module(name: str) -> ast.Module:
    """The syntax tree of one package file (NAME or STAGE.__init__)."""
    return ast.parse((PACKAGE / module_path(name)).read_text(encoding="utf-8"))


def location(importer: str, lineno: int) -> str:
    """FILE:LINE of an import, for messages (SCRIPT_IMPORTS for the script's own)."""
    return f"{'submission.SCRIPT_IMPORTS' if importer == ROOT else module_path(importer)}:{lineno}"


def relative_target(importer: str, node: ast.ImportFrom) -> str:
    """The dotted name `from .x import` refers to, seen from module `importer` (`stage.__init__` for a stage)."""
    package = importer.split(".")[:-1]
    if node.level - 1 > len(package):
        raise SubmissionError(f"{location(importer, node.lineno)}: relative import beyond the package")
    return ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))


def defining_module(target: str, name: str, where: str) -> str:
    """The module that defines `name`: `target` itself, or the module its stage __init__ re-exports it from."""
    if is_module(target):
        return target
    if not is_stage(target):
        raise SubmissionError(f"{where}: imports {target or 'the package root'}, which is no module of the package")
    if is_module(f"{target}.{name}") or is_stage(f"{target}.{name}"):
        raise SubmissionError(f"{where}: imports module {target}.{name}; the one-file script needs "
                              f"`from .{name} import NAME`")
    init = f"{target}.__init__"
    for node in parse_module(init).body:
        if isinstance(node, ast.ImportFrom) and node.level and name in (a.name for a in node.names):
            return defining_module(relative_target(init, node), name, f"{module_path(init)}:{node.lineno}")
    raise SubmissionError(f"{where}: {name} is not re-exported from a module by {module_path(init)}")


def absolute_self_import(node: ast.Import | ast.ImportFrom) -> bool:
    """`import mdlm_golf...` or `from mdlm_golf... import`: nothing the one-file script could resolve."""
    names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
    return any(n.split(".")[0] == PACKAGE.name for n in names)


def imported_modules(importer: str, tree: ast.Module) -> list[str]:
    """The package modules that `importer` imports names from (its relative imports, in source order)."""
    modules = []
    nodes = sorted((n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))), key=lambda n: n.lineno)
    for node in nodes:
        where = location(importer, node.lineno)
        if absolute_self_import(node):
            raise SubmissionError(f"{where}: imports {PACKAGE.name} by absolute name; use a relative import")
        if isinstance(node, ast.Import) or not node.level:
            continue
        target = relative_target(importer, node)
        for alias in node.names:
            if alias.name == "*" or alias.asname:
                raise SubmissionError(f"{where}: `{ast.unparse(node)}` renames or star-imports; in one file "
                                      f"every name must keep its own")
            module = defining_module(target, alias.name, where)
            if EXCLUDED_PARTS & set(module.split(".")):
                raise SubmissionError(f"{where}: imports {module}, which must stay out of the standalone "
                                      f"script (CLI, downloads, demo)")
            if module not in modules:
                modules.append(module)
    return modules


def script_modules(imports: str = SCRIPT_IMPORTS) -> list[str]:
    """The modules `imports` needs and, recursively, theirs: each after the modules it imports from."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:  # done, or in progress: an import cycle keeps the first-reached module first
            return
        seen.add(name)
        for dependency in imported_modules(name, parse_module(name)):
            visit(dependency)
        order.append(name)

    for module in imported_modules(ROOT, ast.parse(imports)):
        visit(module)
    return order


def drop_relative_imports(tree: ast.Module) -> ast.Module:
    """In one file the package's names are plain globals: drop `from .x import y` wherever it stands."""
    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            block = getattr(node, field, None)
            if isinstance(block, list):
                kept = [n for n in block if not (isinstance(n, ast.ImportFrom) and n.level)]
                if len(kept) < len(block):
                    setattr(node, field, kept or [ast.Pass()])  # a block left empty needs a statement
    return tree


def module_body(name: str) -> tuple[list[str], list[str]]:
    """(absolute import lines, body source) of one package module, its relative imports dropped."""
    imports, body = [], []
    for node in drop_relative_imports(parse_module(name)).body:
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            continue  # stated once at the top of the file
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.append(ast.unparse(node))
        elif isinstance(node, ast.Pass):
            continue  # what dropping left of a module of imports only
        elif not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):
            body.append(ast.unparse(node))  # the module docstring is dropped
    return imports, body


def top_level_names(source: str) -> set[str]:
    """The functions, classes and variables a source defines at its top level."""
    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def claim_names(source: str, where: str, owner: dict[str, str]) -> None:
    """Record who defines each top-level name; in one file a second definition would silently win."""
    for symbol in top_level_names(source):
        if symbol in owner:
            raise SubmissionError(f"{where} and {owner[symbol]} both define {symbol!r}")
        owner[symbol] = where


def build_script() -> str:
    """The modules SCRIPT_MAIN needs concatenated into one standalone file (torch, numpy, sentencepiece only)."""
    imports, parts, owner = list(MAIN_STDLIB), [], {}
    for name in script_modules(SCRIPT_IMPORTS):
        module_imports, body = module_body(name)
        imports += [line for line in module_imports if line not in imports]
        source = "\n\n".join(body)
        claim_names(source, module_path(name), owner)
        parts.append(f"# ---- {module_path(name)}\n{source}")
    claim_names(SCRIPT_MAIN, SCRIPT_NAME, owner)
    header = ('"""MDLM for parameter golf: standalone train + quantize + evaluate, generated by mdlm-golf."""\n'
              "from __future__ import annotations\n")
    script = header + "\n".join(imports) + "\n\n" + "\n\n\n".join(parts) + "\n\n" + SCRIPT_MAIN
    ast.parse(script)  # fail here, not on the record machine
    return script


def script_bytes() -> int:
    """The code bytes a record counts: its one file, the script build_script writes (UTF-8)."""
    return len(build_script().encode("utf-8"))


def write_submission(run_dir: Path, artifact_path: Path, out_dir: Path, *, name: str, github_id: str,
                     eval_results: dict, size_report: dict, hardware: str, seeds: list[int],
                     overwrite: bool = False) -> dict:
    """Write OUT/{train_mdlm.py, README.md, submission.json, train logs}, all or nothing (a temporary folder
    renamed at the end); returns submission.json. An OUT that holds files is replaced only with overwrite."""
    config = read_json_object(Path(run_dir) / "config.json", SubmissionError)
    if config is None:
        raise SubmissionError(f"{Path(run_dir) / 'config.json'}: not found (--run names a run folder)")
    script = build_script()
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
    with atomic_folder(Path(out_dir), replace=overwrite) as tmp:
        (tmp / SCRIPT_NAME).write_text(script, encoding="utf-8")
        (tmp / "submission.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(record_readme(info, config, eval_results), encoding="utf-8")
        for log in sorted(Path(run_dir).glob("*.log")):
            shutil.copyfile(log, tmp / log.name)
    return info


def model_description(config: dict) -> str:
    """What was trained, from the run's config."""
    if config.get("objective") == "ar":
        return ("An autoregressive transformer (RoPE, QK-norm, ReLU^2 MLP, causal attention) trained with "
                "next-token cross-entropy")
    conditioning = " and adaLN conditioning on the noise level" if config.get("time_cond", True) else ""
    block = config.get("block_size", 0)
    blocks = (f", as block diffusion: blocks of {block} tokens, each denoised given the clean blocks before it"
              if 0 < block < config.get("seq_len", block + 1) else "")
    return (f"A masked diffusion language model (MDLM): bidirectional transformer with RoPE, QK-norm, ReLU^2 "
            f"MLP{conditioning}, trained with the continuous-time MDLM ELBO (log-linear schedule, SUBS "
            f"parameterization, {config.get('time_sampling', 'antithetic')} times){blocks}")


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
