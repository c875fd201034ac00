"""The command line end to end on tiny settings, config from env vars, and one-line errors."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import first_docs

from mdlm_golf.cli import main
from mdlm_golf.config import BOS_ID, PRESETS, Config, build_config
from mdlm_golf.data import ByteTable, load_split

EVAL_FIELDS = {"bits", "tokens", "bytes", "bpb", "bits_per_token", "elbo_steps", "num_seqs", "seq_len",
               "mode", "bpb_legacy_4p3"}


@pytest.fixture(scope="module")
def small_docs(tmp_path_factory, shared_docs_path) -> Path:
    """The first 800 documents of the shared corpus."""
    return first_docs(shared_docs_path, 800, tmp_path_factory.mktemp("docs") / "docs.jsonl")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, small_docs, shared_tokenizer_path) -> Path:
    out = tmp_path_factory.mktemp("cli") / "D"
    assert main(["prepare", "--docs", str(small_docs), "--tokenizer", str(shared_tokenizer_path),
                 "--val-docs", "50", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def run_dir(data_dir) -> Path:
    run = data_dir.parent / "R"
    assert main(["train", "--data", str(data_dir), "--out", str(run), "--preset", "tiny",
                 "--steps", "20"]) == 0
    return run


def eval_run(run: Path, data: Path, json_path: Path, *extra: str) -> dict:
    assert main(["eval", "--run", str(run), "--data", str(data), "--elbo-steps", "4", "--num-seqs", "3",
                 "--json", str(json_path), *extra]) == 0
    return json.loads(json_path.read_text())


def without_timing(results: dict) -> dict:
    timing = {"eval_seconds", "seconds_per_slice_per_process"}
    return {mode: {k: v for k, v in r.items() if k not in timing} for mode, r in results.items()}


# ---------------------------------------------------------------- end to end

def test_prepare_writes_manifest_and_shards(data_dir, small_docs, shared_tokenizer_path):
    manifest = json.loads((data_dir / "manifest.json").read_text())
    assert manifest["val"]["docs"] == 50 and manifest["train"]["docs"] == 750
    assert manifest["tokenizer"] == str(shared_tokenizer_path.resolve())
    val = load_split(data_dir, "val", 1024)
    train = load_split(data_dir, "train", 1024)
    assert val.size == manifest["val"]["tokens"] and train.size == manifest["train"]["tokens"]
    assert (val == BOS_ID).sum() == 50 and (train == BOS_ID).sum() == 750
    assert val[0] == BOS_ID and train[0] == BOS_ID


def test_train_writes_config_metrics_model_and_eval(run_dir):
    config = json.loads((run_dir / "config.json").read_text())
    expected = Config(**{**PRESETS["tiny"], "steps": 20}).to_dict()
    assert config == expected
    assert config["num_layers"] == 2 and config["steps"] == 20

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    log_every = PRESETS["tiny"]["log_every"]
    assert [r["step"] for r in records] == list(range(log_every, 21, log_every))
    for r in records:
        assert {"step", "loss", "lr", "tokens_per_s", "elapsed_s"} <= set(r)
        assert math.isfinite(r["loss"]) and 0 < r["loss"] < 50
        assert 0 < r["lr"] <= PRESETS["tiny"]["lr"] and r["tokens_per_s"] > 0 and r["elapsed_s"] > 0
    assert [r["elapsed_s"] for r in records] == sorted(r["elapsed_s"] for r in records)

    assert (run_dir / "model.pt").is_file() and (run_dir / "train.log").is_file()
    results = json.loads((run_dir / "eval.json").read_text())
    assert set(results) == {"strict", "anchored"}
    for mode, r in results.items():
        assert EVAL_FIELDS <= set(r) and r["mode"] == mode
        assert r["elbo_steps"] == PRESETS["tiny"]["elbo_steps"]
        assert r["num_seqs"] == PRESETS["tiny"]["eval_num_seqs"]


def test_eval_defaults_reproduce_the_runs_own_eval(run_dir, data_dir, tmp_path):
    """Unset flags take the run's elbo_steps, eval_num_seqs and seed: the same figure as eval.json."""
    assert main(["eval", "--run", str(run_dir), "--data", str(data_dir), "--json", str(tmp_path / "e.json")]) == 0
    assert without_timing(json.loads((tmp_path / "e.json").read_text())) == \
        without_timing(json.loads((run_dir / "eval.json").read_text()))


def test_eval_json_fields_and_exact_byte_count(run_dir, data_dir, shared_sp):
    results = eval_run(run_dir, data_dir, run_dir / "e.json")
    assert set(results) == {"strict", "anchored"}
    seq_len = PRESETS["tiny"]["seq_len"]
    head = load_split(data_dir, "val", 1024)[: 3 * seq_len].astype(np.int64)  # the 3 evaluated slices
    exact_bytes = int(ByteTable.from_tokenizer(shared_sp, 1024).stream_bytes(head).sum())
    assert exact_bytes == len(shared_sp.decode(head[head != BOS_ID].tolist()).encode("utf-8"))
    for mode, r in results.items():
        assert EVAL_FIELDS <= set(r)
        assert r["mode"] == mode
        assert r["elbo_steps"] == 4 and r["num_seqs"] == 3 and r["seq_len"] == seq_len
        assert r["bytes"] == exact_bytes
        assert math.isfinite(r["bits"]) and r["bits"] > 0
        assert r["bpb"] == pytest.approx(r["bits"] / r["bytes"], rel=1e-12)
        assert r["bits_per_token"] == pytest.approx(r["bits"] / r["tokens"], rel=1e-12)
        assert r["bpb_legacy_4p3"] == pytest.approx(r["bits"] / (r["tokens"] * 4.3), rel=1e-12)
    # strict scores every token of the slices; anchored leaves the BOS anchors out
    assert results["strict"]["tokens"] == 3 * seq_len
    assert results["anchored"]["tokens"] == 3 * seq_len - int((head == BOS_ID).sum())


def test_eval_is_deterministic(run_dir, data_dir, tmp_path):
    first = eval_run(run_dir, data_dir, tmp_path / "a.json")
    second = eval_run(run_dir, data_dir, tmp_path / "b.json")
    assert without_timing(first) == without_timing(second)
    other = eval_run(run_dir, data_dir, tmp_path / "c.json", "--seed", "1")  # the seed matters
    assert other["strict"]["bits"] != first["strict"]["bits"]
    assert other["strict"]["bytes"] == first["strict"]["bytes"]
    strict = eval_run(run_dir, data_dir, tmp_path / "d.json", "--mode", "strict", "--batch-rows", "5")
    assert set(strict) == {"strict"}  # batching never changes the mask draws
    assert strict["strict"]["bits"] == pytest.approx(first["strict"]["bits"], rel=1e-6)


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "mdlm_golf", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    for command in ("prepare", "train", "eval"):
        assert command in out.stdout


# ---------------------------------------------------------------- config from env vars and flags

def test_build_config_from_environment():
    cfg = build_config(environ={"NUM_LAYERS": "3", "SEQ_LEN": "128", "LR": "1e-3", "LAYOUT": "stream",
                                "STEPS": "2e3", "num_heads": "4", "UNRELATED": "x"})
    assert (cfg.num_layers, cfg.seq_len, cfg.lr, cfg.layout, cfg.steps) == (3, 128, 1e-3, "stream", 2000)
    assert isinstance(cfg.steps, int) and isinstance(cfg.lr, float)
    assert cfg.num_heads == Config().num_heads  # only UPPER_CASE names are config variables
    assert cfg.model_dim == Config().model_dim

    assert build_config(environ={"NUM_LAYERS": "3"}, overrides={"num_layers": 5}).num_layers == 5
    assert build_config(environ={"NUM_LAYERS": "3"}, overrides={"num_layers": None}).num_layers == 3

    tiny = build_config("tiny", environ={})
    assert tiny.to_dict() == {**Config().to_dict(), **PRESETS["tiny"]}
    layered = build_config("tiny", environ={"NUM_LAYERS": "3"}, overrides={"seq_len": 32})
    assert (layered.num_layers, layered.seq_len, layered.model_dim) == (3, 32, PRESETS["tiny"]["model_dim"])
    assert build_config("seed", environ={}) == Config()

    with pytest.raises(ValueError, match="preset"):
        build_config("huge", environ={})
    for name, raw in (("NUM_LAYERS", "abc"), ("NUM_LAYERS", "2.5"), ("LR", "fast")):
        with pytest.raises(ValueError) as err:
            build_config(environ={name: raw})
        assert name.lower() in str(err.value) and raw in str(err.value)
    with pytest.raises(ValueError, match="num_layers"):
        build_config(environ={"NUM_LAYERS": "0"})
    with pytest.raises(ValueError, match="layout"):
        build_config(environ={"LAYOUT": "rows"})


def test_train_reads_env_vars_and_flags_override_them(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NUM_LAYERS", "1")
    monkeypatch.setenv("MODEL_DIM", "32")
    base = ["train", "--data", str(data_dir), "--preset", "tiny", "--steps", "2", "--no-eval"]
    assert main([*base, "--out", str(tmp_path / "env")]) == 0
    config = json.loads((tmp_path / "env" / "config.json").read_text())
    assert (config["num_layers"], config["model_dim"], config["steps"]) == (1, 32, 2)
    assert config["seq_len"] == PRESETS["tiny"]["seq_len"]
    assert not (tmp_path / "env" / "eval.json").exists()
    assert len((tmp_path / "env" / "metrics.jsonl").read_text().splitlines()) == 1  # step 2 only

    assert main([*base, "--out", str(tmp_path / "flag"), "--num-layers", "2"]) == 0
    config = json.loads((tmp_path / "flag" / "config.json").read_text())
    assert (config["num_layers"], config["model_dim"]) == (2, 32)


# ---------------------------------------------------------------- errors: exit 2, one line naming the file

def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"mdlm-golf {command}: error: "), err
    return err


def test_eval_missing_run(data_dir, tmp_path, capsys):
    run = tmp_path / "no_such_run"
    assert main(["eval", "--run", str(run), "--data", str(data_dir)]) == 2
    assert str(run / "model.pt") in one_line_error(capsys, "eval")


def test_train_on_corrupted_shard(data_dir, tmp_path, capsys):
    data = tmp_path / "D"
    shutil.copytree(data_dir, data)
    shard = data / "fineweb_train_000000.bin"
    raw = bytearray(shard.read_bytes())
    raw[:4] = np.array([12345], dtype="<i4").tobytes()
    shard.write_bytes(bytes(raw))
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "R"), "--preset", "tiny",
                 "--steps", "1"]) == 2
    err = one_line_error(capsys, "train")
    assert str(shard) in err and "magic" in err
    assert not (tmp_path / "R" / "model.pt").exists()


def test_prepare_missing_docs(tmp_path, capsys, shared_tokenizer_path):
    docs = tmp_path / "missing.jsonl"
    assert main(["prepare", "--docs", str(docs), "--tokenizer", str(shared_tokenizer_path),
                 "--out", str(tmp_path / "D")]) == 2
    assert str(docs) in one_line_error(capsys, "prepare")


def test_prepare_bad_json_line(tmp_path, capsys, shared_tokenizer_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "a"}\n{"text": "b"\n', encoding="utf-8")
    assert main(["prepare", "--docs", str(docs), "--tokenizer", str(shared_tokenizer_path),
                 "--out", str(tmp_path / "D"), "--val-docs", "1"]) == 2
    assert f"{docs}:2" in one_line_error(capsys, "prepare")


def test_train_bad_flag_value_and_missing_tokenizer(data_dir, tmp_path, capsys):
    assert main(["train", "--data", str(data_dir), "--out", str(tmp_path / "R"),
                 "--num-layers", "abc"]) == 2
    assert "num_layers" in one_line_error(capsys, "train")

    bare = tmp_path / "bare"  # shards but no manifest.json: the tokenizer is unknown
    bare.mkdir()
    for shard in data_dir.glob("*.bin"):
        shutil.copy(shard, bare)
    assert main(["train", "--data", str(bare), "--out", str(tmp_path / "R2"), "--preset", "tiny"]) == 2
    assert str(bare / "manifest.json") in one_line_error(capsys, "train")
