"""Faults during training: SIGKILL + resume, SIGTERM, a crash mid-checkpoint, NaN loss, the
wall-clock cap, and bad checkpoints (one-line errors, exit 2)."""
from __future__ import annotations

import inspect
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import clean_env, small_data
import torch

import mdlm_golf.checkpoint
import mdlm_golf.train.loop
from mdlm_golf.checkpoint import read_checkpoint
from mdlm_golf.cli import main
from mdlm_golf.config import build_config
from mdlm_golf.train.loop import train

TIMEOUT = 240  # seconds for any one subprocess
CPU = torch.device("cpu")
# 20k-token shards, one per group: the loader rotates groups (with prefetch) every ~40 steps
KILL_RUN = ["--preset", "tiny", "--steps", "300", "--log-every", "1", "--checkpoint-every", "25",
            "--shards-per-group", "1", "--no-eval"]




def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mdlm_golf", *args]
    out = subprocess.run(command, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, f"{' '.join(command)} exited {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out


def start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """A training subprocess in the background, its output in a file (no pipe to fill up)."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "mdlm_golf", *args], cwd=cwd, env=clean_env(),
                                stdout=f, stderr=subprocess.STDOUT)


def metrics_lines(run_dir: Path) -> int:
    try:
        return (run_dir / "metrics.jsonl").read_text().count("\n")
    except FileNotFoundError:
        return 0


def wait_until(proc: subprocess.Popen, ready, log: Path, what: str, timeout: float = TIMEOUT) -> None:
    """Poll until ready(); fail clearly if the process ends first or it takes too long."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run exited (code {proc.returncode}) before {what}; it is too fast to "
                        f"interrupt here: raise --steps.\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait(30)
            pytest.fail(f"timed out waiting for {what}\n{log.read_text()[-3000:]}")
        time.sleep(0.02)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, shared_docs_path, shared_tokenizer_path) -> Path:
    """The first 800 shared documents: 10 val documents, train in 20k-token shards (~14 of them)."""
    return small_data(tmp_path_factory.mktemp("faults"), shared_docs_path, shared_tokenizer_path, 800,
                      val_docs=10, shard_tokens=20_000)


def tiny(**overrides):
    return build_config("tiny", environ={}, overrides=overrides)


def step_arg(original, args, kwargs) -> int:
    """The 0-based `step` a call of train_step was given, however it was passed."""
    return inspect.signature(original).bind(*args, **kwargs).arguments["step"]


# ---------------------------------------------------------------- SIGKILL, then --resume

def test_killed_run_resumes_to_the_uninterrupted_losses(data_dir, tmp_path):
    ref, run = tmp_path / "REF", tmp_path / "RUN"
    log, ref_log = tmp_path / "killed.out", tmp_path / "ref.out"
    # the uninterrupted reference runs alongside (one thread each, two cores)
    reference = start(["train", "--data", str(data_dir), "--out", str(ref), *KILL_RUN], tmp_path, ref_log)
    proc = start(["train", "--data", str(data_dir), "--out", str(run), *KILL_RUN], tmp_path, log)
    try:
        # after a checkpoint, and at least 5 steps past the last checkpoint boundary
        wait_until(proc, lambda: (run / "checkpoint.pt").is_file()
                   and metrics_lines(run) >= 60 and metrics_lines(run) % 25 >= 5,
                   log, "a checkpoint and 60 logged steps")
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
        logged = metrics_lines(run)
        saved = read_checkpoint(run / "checkpoint.pt")["step"]
        assert saved % 25 == 0 and 50 <= saved < logged, (saved, logged)  # records past it to drop
        assert not (run / "model.pt").exists()

        cli(["train", "--resume", str(run), "--data", str(data_dir), "--no-eval"], tmp_path)
        assert reference.wait(TIMEOUT) == 0, ref_log.read_text()[-3000:]
    finally:
        for p in (proc, reference):
            if p.poll() is None:
                p.kill()
                p.wait(30)
    got, want = records(run), records(ref)
    assert [r["step"] for r in got] == list(range(1, 301))
    assert [r["step"] for r in want] == list(range(1, 301))
    for a, b in zip(got, want):
        assert a["loss"] == b["loss"] and a["lr"] == b["lr"], f"step {a['step']}: {a} vs {b}"
    assert f"resumed from {run / 'checkpoint.pt'} at step {saved}" in (run / "train.log").read_text()
    resumed, reference = torch.load(run / "model.pt"), torch.load(ref / "model.pt")
    assert resumed["step"] == reference["step"] == 300
    for name, tensor in reference["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name


# ---------------------------------------------------------------- SIGTERM

def test_sigterm_checkpoints_and_exits_cleanly(data_dir, tmp_path):
    run, log = tmp_path / "RUN", tmp_path / "term.out"
    proc = start(["train", "--data", str(data_dir), "--out", str(run), "--preset", "tiny", "--steps", "100",
                  "--log-every", "1", "--no-eval"], tmp_path, log)
    try:
        wait_until(proc, lambda: metrics_lines(run) >= 10, log, "10 logged steps")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    saved = read_checkpoint(run / "checkpoint.pt")["step"]
    assert 10 <= saved < 100
    assert [r["step"] for r in records(run)] == list(range(1, saved + 1))
    text = (run / "train.log").read_text()
    assert f"stopped at step {saved}: SIGTERM" in text
    assert "--resume" in log.read_text()
    assert not (run / "model.pt").exists() and not (run / "eval.json").exists()

    cli(["train", "--resume", str(run), "--data", str(data_dir)], tmp_path)
    assert [r["step"] for r in records(run)] == list(range(1, 101))
    assert read_checkpoint(run / "model.pt")["step"] == 100 and (run / "eval.json").is_file()
    assert f"resumed from {run / 'checkpoint.pt'} at step {saved}" in (run / "train.log").read_text()


# ---------------------------------------------------------------- a crash while writing a checkpoint

def test_crash_mid_checkpoint_keeps_the_previous_one(data_dir, shared_tokenizer_path, tmp_path, monkeypatch):
    cfg = tiny(steps=4, log_every=1, checkpoint_every=2)
    run, final = tmp_path / "RUN", tmp_path / "RUN" / "checkpoint.pt"
    real_save, targets, before = torch.save, [], {}

    def save_then_crash(obj, f, *args, **kwargs):
        targets.append(Path(f.name))  # the open temporary torch.save writes into
        if len(targets) == 1:
            return real_save(obj, f, *args, **kwargs)
        before["bytes"] = final.read_bytes()
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: buffer.tell() // 2])  # a partial file, then the crash
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as mp:
        mp.setattr(mdlm_golf.checkpoint.torch, "save", save_then_crash)
        with pytest.raises(OSError, match="No space"):
            train(cfg, data_dir, run, shared_tokenizer_path, run_eval=False, device=CPU)
    assert len(targets) == 2
    assert targets[1].parent == run and targets[1].name != "checkpoint.pt"  # written beside, not over
    assert final.read_bytes() == before["bytes"]  # the step-2 checkpoint, untouched
    assert read_checkpoint(final)["step"] == 2
    assert not (run / "model.pt").exists()

    # it still resumes, to the losses of an uninterrupted run
    train(cfg, data_dir, run, shared_tokenizer_path, run_eval=False, resume=True, device=CPU)
    train(cfg, data_dir, tmp_path / "REF", shared_tokenizer_path, run_eval=False, device=CPU)
    got, want = records(run), records(tmp_path / "REF")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert [r["loss"] for r in got] == [r["loss"] for r in want]


# ---------------------------------------------------------------- NaN / inf loss

@pytest.mark.parametrize("bad_step, value, checkpoint_every", [(3, float("nan"), 2), (1, float("inf"), 0)])
def test_non_finite_loss_names_the_step_and_writes_nothing(data_dir, shared_tokenizer_path, tmp_path, capsys,
                                                           monkeypatch, bad_step, value, checkpoint_every):
    original = mdlm_golf.train.loop.train_step

    def spoiled(*args, **kwargs):
        loss = original(*args, **kwargs)
        return loss * value if step_arg(original, args, kwargs) + 1 >= bad_step else loss

    monkeypatch.setattr(mdlm_golf.train.loop, "train_step", spoiled)
    run = tmp_path / "RUN"
    cfg = tiny(steps=6, log_every=5, checkpoint_every=checkpoint_every)
    with pytest.raises(FloatingPointError) as err:
        train(cfg, data_dir, run, shared_tokenizer_path, device=CPU)
    message = str(err.value)
    assert re.search(rf"\bat step {bad_step}\b", message), message
    assert "\n" not in message
    assert not (run / "model.pt").exists() and not (run / "eval.json").exists()
    if checkpoint_every:  # the step-2 checkpoint stays; none after the NaN (its step-4 one is skipped)
        assert read_checkpoint(run / "checkpoint.pt")["step"] == 2 < bad_step
        assert [r["step"] for r in records(run)] == [2]
    else:
        assert not (run / "checkpoint.pt").exists()
        assert records(run) == []
    assert not any(p.name.startswith(".") for p in run.iterdir())  # no stray temp files

    # the command line: exit 2, one line
    out = tmp_path / "CLI"
    capsys.readouterr()
    assert main(["train", "--data", str(data_dir), "--out", str(out), "--preset", "tiny", "--steps", "6",
                 "--log-every", "5"]) == 2
    assert re.search(rf"\bat step {bad_step}\b", one_line_error(capsys, "train"))
    assert not (out / "model.pt").exists()


# ---------------------------------------------------------------- the wall-clock cap

def test_wallclock_cap_stops_at_a_step_boundary(data_dir, shared_tokenizer_path, tmp_path, monkeypatch):
    original = mdlm_golf.train.loop.train_step

    def slow(*args, **kwargs):
        time.sleep(0.05)
        return original(*args, **kwargs)

    monkeypatch.setattr(mdlm_golf.train.loop, "train_step", slow)
    run = tmp_path / "RUN"
    cfg = tiny(steps=10_000, max_wallclock=0.5, log_every=1, eval_num_seqs=2, elbo_steps=2)
    summary = train(cfg, data_dir, run, shared_tokenizer_path, device=CPU)
    done = summary["steps"]
    assert 1 <= done < 10_000
    assert "wall-clock cap" in summary["stop_reason"]
    text = (run / "train.log").read_text()
    assert f"stopped at step {done}: wall-clock cap of 0.5s" in text
    history = records(run)
    assert history[-1]["step"] == done and history[-1]["elapsed_s"] >= 0.5
    assert all(r["elapsed_s"] < 0.5 for r in history[:-1])  # the first boundary past the cap
    assert read_checkpoint(run / "model.pt")["step"] == done
    assert (run / "eval.json").is_file() and set(summary["eval"]) == {"strict", "anchored"}
    assert not (run / "checkpoint.pt").exists()


# ---------------------------------------------------------------- bad checkpoints: exit 2, one line

def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"mdlm-golf {command}: error: "), err
    return err


@pytest.fixture(scope="module")
def checkpointed_run(data_dir) -> Path:
    run = data_dir.parent / "CKPT"
    assert main(["train", "--data", str(data_dir), "--out", str(run), "--preset", "tiny", "--steps", "2",
                 "--log-every", "1", "--checkpoint-every", "2", "--no-eval"]) == 0
    return run


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_resume_with_a_different_model_config(checkpointed_run, data_dir, tmp_path, capsys):
    run = copy_run(checkpointed_run, tmp_path / "R")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--data", str(data_dir), "--num-layers", "3"]) == 2
    err = one_line_error(capsys, "train")
    assert str(run / "checkpoint.pt") in err and "num_layers" in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing touched
    # run-control fields may change: more steps continue the run
    assert main(["train", "--resume", str(run), "--data", str(data_dir), "--steps", "4", "--no-eval"]) == 0
    assert [r["step"] for r in records(run)] == [1, 2, 3, 4]


def test_resume_beside_out_is_the_users_own_command(checkpointed_run, data_dir, tmp_path, capsys):
    """`train --resume R --out R` (the command that started the run, --resume added) continues the run;
    --out naming another folder stays a one-line refusal that names it, and changes nothing."""
    run = copy_run(checkpointed_run, tmp_path / "S")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--out", str(tmp_path / "other"), "--data", str(data_dir)]) == 2
    assert f"--out {tmp_path / 'other'}" in one_line_error(capsys, "train")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before and not (tmp_path / "other").exists()
    same = tmp_path / "x" / ".." / "S"  # spelled differently, the same folder
    assert main(["train", "--resume", str(run), "--out", str(same), "--data", str(data_dir), "--steps", "4",
                 "--no-eval"]) == 0
    assert [r["step"] for r in records(run)] == [1, 2, 3, 4]


def test_resume_from_a_truncated_or_missing_checkpoint(checkpointed_run, data_dir, tmp_path, capsys):
    run = copy_run(checkpointed_run, tmp_path / "T")
    truncate(run / "checkpoint.pt")
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--data", str(data_dir)]) == 2
    assert str(run / "checkpoint.pt") in one_line_error(capsys, "train")

    (run / "checkpoint.pt").unlink()
    assert main(["train", "--resume", str(run), "--data", str(data_dir)]) == 2
    err = one_line_error(capsys, "train")
    assert str(run / "checkpoint.pt") in err and "not found" in err


def test_eval_of_a_truncated_model(checkpointed_run, data_dir, tmp_path, capsys):
    run = copy_run(checkpointed_run, tmp_path / "E")
    truncate(run / "model.pt")
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--data", str(data_dir), "--num-seqs", "2",
                 "--elbo-steps", "2"]) == 2
    assert str(run / "model.pt") in one_line_error(capsys, "eval")
