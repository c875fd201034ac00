"""The generated single-file train_mdlm.py runs standalone and agrees with the package's own evaluation."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mdlm_golf import submission
from mdlm_golf.artifact import load_artifact
from mdlm_golf.data import ByteTable, load_split, load_tokenizer
from mdlm_golf.eval import evaluate
from mdlm_golf.submission import (SCRIPT_NAME, SubmissionError, build_script, script_bytes, script_modules,
                                  write_submission)


@pytest.fixture(scope="module")
def script_run(tmp_path_factory, prepared_data, shared_tokenizer_path):
    """Run the generated script on tiny settings in a folder of its own, as a record machine would."""
    root = tmp_path_factory.mktemp("record")
    script = root / SCRIPT_NAME
    script.write_text(build_script())
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(PRESET="tiny", STEPS="15", EVAL_NUM_SEQS="3", ELBO_STEPS="4", QUANT="int8",
               DATA_PATH=str(prepared_data), TOKENIZER_PATH=str(shared_tokenizer_path),
               RUN_DIR=str(root / "run"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-I", str(script)], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root, proc.stdout


def test_script_is_standalone():
    script = build_script()
    imports = [line for line in script.splitlines() if line.startswith(("import ", "from "))]
    roots = {line.split()[1].split(".")[0] for line in imports}
    assert roots <= {"__future__", "dataclasses", "json", "math", "os", "pathlib", "typing", "numpy",
                     "torch", "glob", "hashlib", "threading", "time", "concurrent", "pickle", "zipfile",
                     "platform", "signal", "subprocess", "sys", "contextlib", "lzma", "struct", "zlib", "enum",
                     "resource", "gc", "functools", "shutil", "io", "errno"}
    assert "mdlm_golf" not in "\n".join(imports)


def test_script_modules_follow_the_imports():
    """The closure of what main needs: every artifact module, no stage __init__, no CLI/download/demo,
    and each module after every module it imports from."""
    modules = script_modules()
    assert {"artifact.export", "artifact.fileformat", "artifact.quant", "artifact.gptq", "artifact.size",
            "eval.elbo", "train.loop", "data.loader", "dist", "files", "config", "model"} <= set(modules)
    assert not any(m.endswith("__init__") or m in ("cli", "demo", "data.download", "submission")
                   for m in modules)
    for i, name in enumerate(modules):
        tree = submission.parse_module(name)
        assert set(submission.imported_modules(name, tree)) - {name} <= set(modules[:i]), name


def fake_package(root, files: dict[str, str]):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_script_modules_resolve_stage_reexports(tmp_path, monkeypatch):
    monkeypatch.setattr(submission, "PACKAGE", fake_package(tmp_path, {
        "base.py": "X = 1\n", "stage/__init__.py": "from .inner import f\n",
        "stage/inner.py": "from ..base import X\n\ndef f():\n    from .helper import g\n    return g() + X\n",
        "stage/helper.py": "def g():\n    return 2\n", "stage/unused.py": "from ..cli import main\n"}))
    assert script_modules("from .stage import f\n") == ["base", "stage.helper", "stage.inner"]


@pytest.mark.parametrize("files,message", [
    ({"a.py": "from .cli import main\n", "cli.py": "def main(): pass\n"}, "a.py:1: imports cli"),
    ({"a.py": "x = 1\n\nfrom .data.download import fetch\n", "data/__init__.py": "",
      "data/download.py": "def fetch(): pass\n"}, "a.py:3: imports data.download"),
    ({"a.py": "from .stage import fetch\n", "stage/__init__.py": "from .download import fetch\n",
      "stage/download.py": "def fetch(): pass\n"}, "a.py:1: imports stage.download"),
    ({"a.py": "def f():\n    from .demo import run_demo\n", "demo.py": "def run_demo(): pass\n"},
     "a.py:2: imports demo"),
    ({"a.py": "from .stage import f\n", "stage/__init__.py": "def f(): pass\n"}, "not re-exported"),
    ({"a.py": "from .b import f as g\n", "b.py": "def f(): pass\n"}, "renames"),
    ({"a.py": "from mdlm_golf.b import f\n", "b.py": "def f(): pass\n"}, "absolute name"),
])
def test_script_modules_refuse(tmp_path, monkeypatch, files, message):
    monkeypatch.setattr(submission, "PACKAGE", fake_package(tmp_path / "mdlm_golf", files))
    with pytest.raises(SubmissionError, match=message) as e:
        script_modules("from .a import f\n")
    assert "\n" not in str(e.value)


def test_script_refuses_a_name_defined_twice(tmp_path, monkeypatch):
    monkeypatch.setattr(submission, "PACKAGE", fake_package(tmp_path, {
        "a.py": "def f(): pass\n", "b.py": "def f(): pass\n\ndef g(): pass\n"}))
    monkeypatch.setattr(submission, "SCRIPT_IMPORTS", "from .a import f\nfrom .b import g\n")
    with pytest.raises(SubmissionError, match="b.py and a.py both define 'f'"):
        build_script()


def test_script_trains_and_reports_the_package_figure(script_run, prepared_data, shared_tokenizer_path):
    root, stdout = script_run
    run = root / "run"
    assert "step 15/15" in (run / "train.log").read_text()
    reported = json.loads((run / "eval_artifact.json").read_text())
    assert "final_artifact strict" in stdout and set(reported) == {"strict"}  # the headline only
    plan_line = next(line for line in stdout.splitlines() if line.startswith("eval plan:"))
    assert "at 4 ELBO steps projects to" in plan_line and "budget 480s" in plan_line
    assert stdout.index("eval plan:") < stdout.index("eval took") < stdout.index("final_artifact strict")
    # its size table counts the script's own file as the code bytes
    code_line = next(line for line in stdout.splitlines() if line.startswith("code (record script)"))
    assert code_line.split()[-1] == f"{(root / SCRIPT_NAME).stat().st_size:,}"

    model, cfg, _ = load_artifact(run / "final_model.mdlm")
    byte_table = ByteTable.from_tokenizer(load_tokenizer(shared_tokenizer_path), cfg.vocab_size)
    ours = evaluate(model, load_split(prepared_data, "val", cfg.vocab_size), byte_table, cfg,
                    steps=cfg.elbo_steps, num_seqs=cfg.eval_num_seqs, seed=cfg.seed)
    for mode in reported:
        assert ours[mode]["bpb"] == pytest.approx(reported[mode]["bpb"], rel=1e-9)
        assert ours[mode]["bytes"] == reported[mode]["bytes"] and ours[mode]["tokens"] == reported[mode]["tokens"]


def test_record_folder(script_run, tmp_path):
    root, _ = script_run
    run = root / "run"
    results = json.loads((run / "eval_artifact.json").read_text())
    info = write_submission(run, run / "final_model.mdlm", tmp_path / "records" / "2026-11-26_tiny",
                            name="tiny MDLM", github_id="someone", eval_results=results,
                            size_report={"spec": "int8", "compressor": "lzma"}, hardware="CPU (test)",
                            seeds=[1337])
    out = tmp_path / "records" / "2026-11-26_tiny"
    saved = json.loads((out / "submission.json").read_text())
    assert saved == info
    assert saved["bytes_code"] == (out / SCRIPT_NAME).stat().st_size == script_bytes()
    assert saved["bytes_model"] == (run / "final_model.mdlm").stat().st_size
    assert saved["bytes_total"] == saved["bytes_code"] + saved["bytes_model"]
    assert saved["val_bpb"] == results["strict"]["bpb"] and "upper bound" in saved["metric"]
    readme = (out / "README.md").read_text()
    assert f"{results['strict']['bpb']:.4f}" in readme and "strict" in readme
    assert (out / "train.log").read_text() == (run / "train.log").read_text()
