"""The run log and the stop vote: the log line's fields, metrics.jsonl, and no host sync per step.

The vote tests run train() on a fake clock that moves STEP_SECONDS per step and nowhere else, so
which steps vote, where a capped run stops and the lr it sets are exact numbers.
"""
from __future__ import annotations

import dataclasses

import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import clean_env, small_data

import mdlm_golf.train.control
import mdlm_golf.train.loop
from mdlm_golf.config import build_config
from mdlm_golf.model import Transformer
from mdlm_golf.train.loop import train
from mdlm_golf.train.optim import lr_factor
from mdlm_golf.train.runlog import peak_flops, step_line

CPU = torch.device("cpu")
STEP_SECONDS = 0.125  # a binary fraction: sums of it are exact
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
LINE = re.compile(r"step (\d+)/(\d+) \| loss \d+\.\d{4} \| lr \d\.\d\de-\d\d \| dt [\d.]+ms \| "
                  r"tok/s [\d,]+ \| mfu (-|[\d.]+%) \| mem \d+(\.\d)?(MiB|GiB)")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, shared_docs_path, shared_tokenizer_path) -> Path:
    """The first 200 fixture documents: 10 val documents, train in 20k-token shards."""
    return small_data(tmp_path_factory.mktemp("runlog"), shared_docs_path, shared_tokenizer_path, 200,
                      val_docs=10, shard_tokens=20_000)


def tiny(**overrides):
    return build_config("tiny", environ={}, overrides=overrides)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class FakeClock:
    """train()'s clock moves STEP_SECONDS per train_step; each vote is noted with the steps done by then."""

    def __init__(self, monkeypatch):
        self.now, self.steps, self.votes = 0.0, 0, []
        step, reduce = mdlm_golf.train.loop.train_step, mdlm_golf.train.control.all_reduce_sum

        def timed_step(*args, **kwargs):
            self.steps += 1
            self.now += STEP_SECONDS
            return step(*args, **kwargs)

        def counted_reduce(tensor):
            # run control's all-reduces are the votes, read on the host (train_step's own all-reduce,
            # the batch's scored-token count, stays on the device, read by no one)
            self.votes.append(self.steps)
            return reduce(tensor)

        monkeypatch.setattr(mdlm_golf.train.loop, "train_step", timed_step)
        monkeypatch.setattr(mdlm_golf.train.control, "all_reduce_sum", counted_reduce)
        monkeypatch.setattr(mdlm_golf.train.control, "time", types.SimpleNamespace(perf_counter=lambda: self.now))


def test_an_uncapped_run_votes_only_at_log_steps(data_dir, shared_tokenizer_path, tmp_path, monkeypatch):
    clock = FakeClock(monkeypatch)
    cfg = tiny(steps=20, log_every=5)
    train(cfg, data_dir, tmp_path / "RUN", shared_tokenizer_path, run_eval=False, device=CPU,
          echo=lambda _: None)
    assert clock.steps == 20
    assert clock.votes == [5, 10, 15, 20]  # one host sync per log line, none between

    history = records(tmp_path / "RUN")
    assert [r["step"] for r in history] == [5, 10, 15, 20]
    for r in history:
        assert r["lr"] == cfg.lr * lr_factor(r["step"] - 1, cfg)  # a function of the step alone
        assert r["dt_ms"] == 1e3 * STEP_SECONDS and r["elapsed_s"] == r["step"] * STEP_SECONDS
        assert r["tokens_per_s"] == cfg.tokens_per_step / STEP_SECONDS
        assert r["mfu"] is None and r["peak_mem_bytes"] > 0  # no MFU on a CPU; its peak RSS
    lines = [line for line in (tmp_path / "RUN" / "train.log").read_text().splitlines()
             if line.startswith("step ")]
    fields = [LINE.fullmatch(line).group(1, 2, 3) for line in lines]
    assert fields == [(f"{step}", "20", "-") for step in (5, 10, 15, 20)]
    assert "| dt 125.0ms |" in lines[0]


def test_a_capped_run_votes_towards_the_cap_and_stops_at_it(data_dir, shared_tokenizer_path, tmp_path,
                                                            monkeypatch):
    clock = FakeClock(monkeypatch)
    # the cap (16 steps of the fake clock) comes long before the steps: the warmdown follows the clock
    cfg = tiny(steps=10_000, max_wallclock=16 * STEP_SECONDS, log_every=5, warmdown_steps=5_000)
    summary = train(cfg, data_dir, tmp_path / "RUN", shared_tokenizer_path, run_eval=False, device=CPU,
                    echo=lambda _: None)
    assert summary["steps"] == 16 and summary["stop_reason"].startswith("wall-clock cap of 2s")
    # the first step times a step; then half way to the cap each time, and log steps
    assert clock.votes == [1, 5, 10, 13, 14, 15, 16]
    history = records(tmp_path / "RUN")
    assert [r["step"] for r in history] == [5, 10, 15, 16]
    for r in history:
        # between votes the lr follows the projected clock, here exactly the true one
        step = r["step"] - 1
        assert r["lr"] == pytest.approx(cfg.lr * lr_factor(step, cfg, step * STEP_SECONDS), rel=1e-12)
        assert r["elapsed_s"] == r["step"] * STEP_SECONDS
    assert history[-1]["lr"] < 0.5 * cfg.lr  # deep in the warmdown at step 16 of 10,000


def test_the_log_line_fields():
    cfg = tiny()
    speed = {"dt_ms": 12.5, "tokens_per_s": 1234.4, "mfu": 0.4123, "peak_mem_bytes": 3 * 2**30}
    assert step_line(3, cfg, 1.5, 1e-3, speed) == ("step 3/20 | loss 1.5000 | lr 1.00e-03 | dt 12.5ms | "
                                                   "tok/s 1,234 | mfu 41.2% | mem 3.0GiB")
    cpu = step_line(3, cfg, 1.5, 1e-3, {**speed, "mfu": None, "peak_mem_bytes": 300 * 2**20})
    assert cpu.endswith("| mfu - | mem 300MiB") and LINE.fullmatch(cpu)


def test_flops_per_token_and_peaks(monkeypatch):
    cfg = tiny()
    d, layers = cfg.model_dim, cfg.num_layers
    matmul = layers * (4 * d * d + 2 * cfg.mlp_mult * d * d) + d * cfg.embed_rows  # qkv, proj, MLP; head
    assert Transformer(cfg).flops_per_token() == 6 * matmul + 12 * layers * d * cfg.seq_len
    block = dataclasses.replace(cfg, block_size=8)  # [x_t ; x_0]: twice the positions, each seeing <= L keys
    assert Transformer(block).flops_per_token() == 2 * (6 * matmul + 12 * layers * d * cfg.seq_len)
    encdec = dataclasses.replace(block, decoder_layers=1)  # encoder over x_0, one decoder layer over x_t
    layer = (matmul - d * cfg.embed_rows) // layers
    assert Transformer(encdec).flops_per_token() == (6 * (matmul + layer + 2 * d * d)
                                                     + 12 * (layers + 1) * d * cfg.seq_len)
    assert peak_flops(CPU) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert peak_flops(torch.device("cuda", 0)) == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert peak_flops(torch.device("cuda", 0)) is None


def test_two_processes_stop_together_at_the_cap(data_dir, tmp_path):
    """Votes between log steps under a cap: both ranks must hold them at the same steps (or hang)."""
    run = tmp_path / "RUN"
    command = [*TORCHRUN, "-m", "mdlm_golf", "train", "--data", str(data_dir), "--out", str(run),
               "--preset", "tiny", "--steps", "100000", "--log-every", "7", "--max-wallclock", "2",
               "--no-eval"]
    out = subprocess.run(command, cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}"
    history = records(run)
    done = history[-1]["step"]
    assert f"stopped at step {done}: wall-clock cap of 2s" in (run / "train.log").read_text()
    # any rank past the cap stops both: rank 0's own clock (logged) may read a little less
    assert all(r["elapsed_s"] < 2 for r in history[:-1]) and history[-1]["elapsed_s"] > 1
