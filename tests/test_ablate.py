"""Ablation runner on tiny settings: one run per value x seed, report files, resume, up-front errors."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import small_data

import mdlm_golf.experiments.ablation as ablate_mod
from mdlm_golf.experiments.ablation import ablate, conclusion, write_report
from mdlm_golf.config import build_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, shared_docs_path, shared_tokenizer_path) -> Path:
    """The first 600 documents of the shared corpus, 50 of them val."""
    return small_data(tmp_path_factory.mktemp("ablate"), shared_docs_path, shared_tokenizer_path, 600,
                      val_docs=50)


def tiny_base():
    return build_config("tiny", environ={}, overrides=dict(steps=12, elbo_steps=4, eval_num_seqs=2,
                                                           log_every=4))


@pytest.fixture(scope="module")
def finished(data_dir, shared_tokenizer_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("abl") / "OUT"
    lines: list[str] = []
    result = ablate(tiny_base(), "num_heads", ["1", "2"], [1, 2], data_dir, out, shared_tokenizer_path,
                    echo=lines.append)
    return result, out, lines


def test_one_run_per_value_and_seed(finished):
    result, out, lines = finished
    saved = json.loads((out / "ablation.json").read_text())
    assert saved["param"] == "num_heads" and saved["values"] == [1, 2] and saved["seeds"] == [1, 2]
    assert sorted((r["value"], r["seed"]) for r in saved["runs"]) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert saved["base_config"]["steps"] == 12 and saved["eval"]["elbo_steps"] == 4
    for r in saved["runs"]:
        run_dir = out / r["run_dir"]
        assert run_dir.name == f"num_heads={r['value']}_seed={r['seed']}"
        cfg = json.loads((run_dir / "config.json").read_text())
        assert (cfg["num_heads"], cfg["seed"]) == (r["value"], r["seed"])
        ev = json.loads((run_dir / "eval.json").read_text())
        assert ev["strict"]["seed"] == saved["eval"]["seed"]  # one mask seed for every run
        assert ev["strict"]["bpb"] == r["strict_bpb"] and 0 < r["strict_bpb"] < 20
        assert r["final_loss"] > 0 and r["num_params"] > 0 and r["train_seconds"] > 0
    assert sum(line.startswith("run ") and "strict bpb" in line for line in lines) == 4
    assert any(line.startswith("run 3/4: num_heads=2 seed=1") for line in lines)


def test_same_seed_same_data_and_masks(finished):
    """Runs that differ only in the ablated value see the same batches and noise: identical
    configs otherwise, so with num_heads the only difference is the model."""
    _, out, _ = finished
    a = json.loads((out / "runs" / "num_heads=1_seed=1" / "config.json").read_text())
    b = json.loads((out / "runs" / "num_heads=2_seed=1" / "config.json").read_text())
    assert {k for k in a if a[k] != b[k]} == {"num_heads"}


def test_markdown_png_and_conclusion(finished):
    result, out, _ = finished
    md = (out / "ablation.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| num_heads")]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "2"]
    assert result["conclusion"] in md and "seed noise" in result["conclusion"]
    png = (out / "ablation.png").read_bytes()
    assert len(png) > 0 and png.startswith(b"\x89PNG\r\n\x1a\n")


def test_conclusion_follows_the_numbers():
    def fake(bpbs: dict) -> dict:
        runs = [{"value": v, "seed": s, "strict_bpb": b, "anchored_bpb": b, "num_params": 1}
                for v, seeds in bpbs.items() for s, b in enumerate(seeds)]
        return {"param": "num_heads", "values": list(bpbs), "seeds": [0, 1], "runs": runs}

    flat = conclusion(fake({2: [2.00, 2.03], 4: [2.02, 2.01], 8: [2.01, 2.02]}))
    consistent = conclusion(fake({2: [2.00, 2.10], 4: [2.01, 2.11]}))
    apart = conclusion(fake({2: [2.00, 2.001], 4: [2.50, 2.501]}))
    assert "within the seed noise" in flat and "show no effect of num_heads" in flat
    assert "within the seed noise" in consistent and "consistent across seeds" in consistent
    assert "larger than the seed noise" in apart and "num_heads matters" in apart
    assert "spans 0.0100 (best num_heads=2: 2.0500, worst num_heads=4: 2.0600)" in consistent
    one_seed = fake({2: [2.0], 4: [2.1]})
    assert "one seed per value" in conclusion(one_seed)
    for text in (flat, consistent, apart):  # one sentence
        assert text.endswith(".") and not re.search(r"\. [A-Z]", text)


def test_write_report_from_a_result(tmp_path, finished):
    result, _, _ = finished
    again = {k: v for k, v in result.items() if k not in ("summary", "conclusion")}
    write_report(again, tmp_path)
    assert (tmp_path / "ablation.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((tmp_path / "ablation.json").read_text())["conclusion"] == result["conclusion"]


def test_rerun_skips_finished_runs(finished, data_dir, shared_tokenizer_path, monkeypatch):
    result, out, _ = finished

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(ablate_mod, "train", no_training)
    lines: list[str] = []
    again = ablate(tiny_base(), "num_heads", [1, 2], [1, 2], data_dir, out, shared_tokenizer_path,
                   echo=lines.append)
    assert [r["strict_bpb"] for r in again["runs"]] == [r["strict_bpb"] for r in result["runs"]]
    assert sum("reused" in line for line in lines) == 4


def test_finished_run_with_another_config_is_an_error(finished, data_dir, shared_tokenizer_path):
    _, out, _ = finished
    base = build_config("tiny", environ={}, overrides=dict(steps=13, elbo_steps=4, eval_num_seqs=2))
    with pytest.raises(ValueError, match="finished with another config"):
        ablate(base, "num_heads", [1], [1], data_dir, out, shared_tokenizer_path, echo=lambda s: None)


@pytest.mark.parametrize("param, values, message", [
    ("layout", ["docs"], "layout is a str field"),
    ("compile", ["true"], "compile is a bool field"),
    ("num_hedas", ["2"], "unknown config field 'num_hedas'"),
    ("seed", ["1"], "cannot ablate seed"),
    ("num_heads", ["two"], "num_heads: cannot read 'two'"),
    ("num_heads", ["1", "3"], "num_heads=3: model_dim 64 must split into 3 heads"),
    ("num_heads", ["2", "2"], "values repeat"),
])
def test_bad_requests_fail_before_training(tmp_path, monkeypatch, data_dir, shared_tokenizer_path,
                                           param, values, message):
    def no_training(*args, **kwargs):
        raise AssertionError("trained before rejecting the request")

    monkeypatch.setattr(ablate_mod, "train", no_training)
    with pytest.raises(ValueError, match=message) as e:
        ablate(tiny_base(), param, values, [1], data_dir, tmp_path / "OUT", shared_tokenizer_path,
               echo=lambda s: None)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "OUT" / "runs").exists()
