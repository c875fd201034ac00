"""torchrun (2 CPU processes, gloo) against one process: same losses, same eval, one set of outputs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import clean_env, small_data

from mdlm_golf.cli import main
from mdlm_golf.data import ByteTable, load_split

TIMEOUT = 240  # seconds for any one subprocess
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
TRAIN = ["--preset", "tiny", "--steps", "8", "--log-every", "1"]




def run(args: list[str], cwd: Path, torchrun: bool = False) -> subprocess.CompletedProcess:
    command = [*(TORCHRUN if torchrun else [sys.executable]), "-m", "mdlm_golf", *args]
    out = subprocess.run(command, cwd=cwd, env=clean_env(), capture_output=True, text=True,
                         timeout=TIMEOUT)
    hint = ("\nA rank aborted at interpreter exit (gloo threads alive): the command never called "
            "torch.distributed.destroy_process_group (mdlm_golf.dist.shutdown).\n"
            if "terminate called without an active exception" in out.stderr else "")
    assert out.returncode == 0, f"{' '.join(command)} exited {out.returncode}{hint}\n{out.stdout}\n{out.stderr}"
    return out


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, shared_docs_path, shared_tokenizer_path) -> Path:
    """The first 800 shared documents; a 10-document val split keeps whole-split eval fast."""
    return small_data(tmp_path_factory.mktemp("dist"), shared_docs_path, shared_tokenizer_path, 800,
                      val_docs=10)


@pytest.fixture(scope="module")
def runs(data_dir) -> dict:
    """R1: one process, 4 rows x 2 accumulation; R2: torchrun, 2 processes x 4 rows x 1."""
    root = data_dir.parent
    one = run(["train", "--data", str(data_dir), "--out", str(root / "R1"), *TRAIN,
               "--batch-rows", "4", "--grad-accum", "2"], root)
    two = run(["train", "--data", str(data_dir), "--out", str(root / "R2"), *TRAIN,
               "--batch-rows", "4", "--grad-accum", "1"], root, torchrun=True)
    return {"R1": root / "R1", "R2": root / "R2", "out1": one, "out2": two}


# ---------------------------------------------------------------- training

def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    one, two = records(runs["R1"]), records(runs["R2"])
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 9))
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), f"step {a['step']}"
        assert b["lr"] == a["lr"]
    eval1 = json.loads((runs["R1"] / "eval.json").read_text())
    eval2 = json.loads((runs["R2"] / "eval.json").read_text())
    assert set(eval1) == set(eval2) == {"strict", "anchored"}
    for mode in eval1:
        assert eval2[mode]["bits"] == pytest.approx(eval1[mode]["bits"], rel=1e-6), mode
        assert (eval2[mode]["tokens"], eval2[mode]["bytes"]) == (eval1[mode]["tokens"], eval1[mode]["bytes"])
        assert eval2[mode]["world_size"] == 2 and eval1[mode]["world_size"] == 1
    # the derived per-process settings are what config.json records
    cfg1 = json.loads((runs["R1"] / "config.json").read_text())
    cfg2 = json.loads((runs["R2"] / "config.json").read_text())
    assert (cfg1["batch_rows"], cfg1["grad_accum"]) == (4, 2)
    assert (cfg2["batch_rows"], cfg2["grad_accum"]) == (4, 1)


def test_only_rank_zero_writes_outputs(runs):
    expected = {"config.json", "metrics.jsonl", "train.log", "model.pt", "eval.json"}
    assert {p.name for p in runs["R2"].iterdir()} == expected  # no per-rank copies, no temp files
    assert {p.name for p in runs["R1"].iterdir()} == expected
    assert len((runs["R2"] / "metrics.jsonl").read_text().splitlines()) == 8
    log = (runs["R2"] / "train.log").read_text().splitlines()
    for step in range(1, 9):
        assert sum(line.startswith(f"step {step}/8 |") for line in log) == 1, step
    for prefix in ("mdlm-golf ", "model: ", "config: ", "loader: ", "stopped at step 8",
                   "eval strict ", "eval anchored "):
        assert sum(line.startswith(prefix) for line in log) == 1, prefix
    assert "2 processes" in next(line for line in log if line.startswith("data: ") and "tokens/step" in line)
    stdout = runs["out2"].stdout.splitlines()  # rank 1 prints nothing either
    assert sum(line.startswith("step 1/8 |") for line in stdout) == 1, runs["out2"].stdout


def test_global_batch_rows_sets_grad_accum_per_world_size(data_dir, runs, tmp_path):
    flags = ["--preset", "tiny", "--steps", "1", "--log-every", "1", "--no-eval",
             "--global-batch-rows", "8", "--batch-rows", "4"]
    assert main(["train", "--data", str(data_dir), "--out", str(tmp_path / "G1"), *flags]) == 0
    run(["train", "--data", str(data_dir), "--out", str(tmp_path / "G2"), *flags], tmp_path, torchrun=True)
    for name, world, accum in (("G1", 1, 2), ("G2", 2, 1)):
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        assert (cfg["global_batch_rows"], cfg["batch_rows"], cfg["grad_accum"]) == (8, 4, accum), name
        log = (tmp_path / name / "train.log").read_text()
        assert f"(4 rows x {accum} accumulation x {world} processes x 64)" in log
        # the same global batch of 8 rows: the first loss is R1's
        [first] = records(tmp_path / name)
        assert first["loss"] == pytest.approx(records(runs["R1"])[0]["loss"], rel=1e-5), name


@pytest.mark.parametrize("kind, extra, described", [
    ("two-half", [], "block diffusion runs [x_t ; x_0]"),
    ("encoder-decoder", ["--decoder-layers", "1"], "N_encoder + N_decoder"),
])
def test_block_diffusion_under_torchrun_matches_one_process(data_dir, tmp_path, kind, extra, described):
    flags = ["--preset", "tiny", "--steps", "2", "--log-every", "1", "--no-eval", "--block-size", "16",
             "--global-batch-rows", "8", "--batch-rows", "4", *extra]
    assert main(["train", "--data", str(data_dir), "--out", str(tmp_path / "B1"), *flags]) == 0
    run(["train", "--data", str(data_dir), "--out", str(tmp_path / "B2"), *flags], tmp_path, torchrun=True)
    one, two = records(tmp_path / "B1"), records(tmp_path / "B2")
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    assert described in (tmp_path / "B2" / "train.log").read_text()


def test_ar_with_muon_under_torchrun_matches_one_process(data_dir, tmp_path):
    """The AR yardstick and Muon's orthogonalized update (on the all-reduced gradient) under DDP: the
    same losses and the same exact chain-rule eval as one process with the same global batch."""
    flags = ["--preset", "tiny", "--steps", "3", "--log-every", "1", "--objective", "ar", "--optimizer", "muon",
             "--global-batch-rows", "8", "--batch-rows", "4", "--eval-num-seqs", "4"]
    assert main(["train", "--data", str(data_dir), "--out", str(tmp_path / "A1"), *flags]) == 0
    run(["train", "--data", str(data_dir), "--out", str(tmp_path / "A2"), *flags], tmp_path, torchrun=True)
    one, two = records(tmp_path / "A1"), records(tmp_path / "A2")
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    eval1, eval2 = (json.loads((tmp_path / name / "eval.json").read_text()) for name in ("A1", "A2"))
    assert set(eval1) == set(eval2) == {"ar"}
    assert eval2["ar"]["bits"] == pytest.approx(eval1["ar"]["bits"], rel=1e-6)
    assert (eval2["ar"]["tokens"], eval2["ar"]["bytes"]) == (eval1["ar"]["tokens"], eval1["ar"]["bytes"])


# ---------------------------------------------------------------- evaluation

def test_distributed_eval_equals_single_process_eval(runs, data_dir):
    run_dir = runs["R1"]
    base = ["eval", "--data", str(data_dir), "--elbo-steps", "4", "--num-seqs", "5"]
    single = run([*base, "--run", str(run_dir), "--json", str(run_dir / "e1.json")], run_dir)
    multi = run([*base, "--run-dir", str(run_dir), "--json", str(run_dir / "e2.json")], run_dir,
                torchrun=True)
    one = json.loads((run_dir / "e1.json").read_text())
    two = json.loads((run_dir / "e2.json").read_text())
    assert set(one) == set(two) == {"strict", "anchored"}
    for mode in one:
        for key in ("tokens", "bytes"):  # 5 slices: rank 0 takes 3, rank 1 takes 2
            assert two[mode][key] == one[mode][key], (mode, key)
        # float32 forwards over batches of 3 and 2 rows round differently from one batch of 5
        assert two[mode]["bits"] == pytest.approx(one[mode]["bits"], rel=1e-6), mode
        assert one[mode]["num_seqs"] == two[mode]["num_seqs"] == 5
        assert (one[mode]["world_size"], two[mode]["world_size"]) == (1, 2)
    for out in (single, multi):  # each figure printed once
        assert sum(line.startswith("strict   bpb") for line in out.stdout.splitlines()) == 1, out.stdout
    assert "on 2 process(es)" in multi.stdout


def test_distributed_whole_split_eval(runs, data_dir, shared_sp):
    run_dir = runs["R1"]
    out = run(["eval", "--run-dir", str(run_dir), "--data", str(data_dir), "--elbo-steps", "2",
               "--num-seqs", "0", "--mode", "strict", "--json", str(run_dir / "e0.json")], run_dir,
              torchrun=True)
    projection = [line for line in out.stdout.splitlines() if "would take" in line]
    assert len(projection) == 1 and "on 8 such devices" in projection[0], out.stdout
    val = load_split(data_dir, "val", 1024)
    assert f"({val.size:,} tokens)" in projection[0]
    r = json.loads((run_dir / "e0.json").read_text())["strict"]
    assert r["num_seqs"] == -(-val.size // 64) and r["world_size"] == 2
    assert r["tokens"] == val.size  # strict scores every token of the split exactly once
    assert r["bytes"] == int(ByteTable.from_tokenizer(shared_sp, 1024).stream_bytes(val.astype("int64")).sum())
