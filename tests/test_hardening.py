"""Issue 12: nothing lost, nothing executed, no traceback. Every finding: one line, exit 2 (130 for Ctrl-C)."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import small_data

import mdlm_golf.data.shards
import mdlm_golf.train.loop
from mdlm_golf.checkpoint import read_checkpoint
from mdlm_golf.cli import main
from mdlm_golf.config import RANGES, Config, build_config, describe_range
from mdlm_golf.console import main as console_main
from mdlm_golf.data import DataError, load_split, prepare, shard_paths
from mdlm_golf.data.shards import write_shard
from mdlm_golf.train.loop import train
from mdlm_golf.train.rundir import RUN_FILES

CPU = torch.device("cpu")
TINY = ["--preset", "tiny", "--log-every", "1"]


def one_line_error(capsys, command: str) -> str:
    """The single stderr line of a failed command (nothing else on stderr, no traceback)."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"mdlm-golf {command}: error: "), err
    return err.strip()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, shared_docs_path, shared_tokenizer_path) -> Path:
    """200 shared documents: 10 val documents, train in 20k-token shards."""
    return small_data(tmp_path_factory.mktemp("hardening"), shared_docs_path, shared_tokenizer_path, 200,
                      val_docs=10, shard_tokens=20_000)


@pytest.fixture(scope="module")
def finished_run(data_dir) -> Path:
    """A 2-step tiny run with its final model and a step-2 checkpoint."""
    run = data_dir.parent / "RUN"
    assert main(["train", "--data", str(data_dir), "--out", str(run), *TINY, "--steps", "2",
                 "--checkpoint-every", "2", "--no-eval"]) == 0
    return run


def copy_of(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ---------------------------------------------------------------- numeric flags and config fields

BAD_FLAGS = [  # (argv, what the line must name); no data needed: each fails before reading any
    (["train", "--data", "D", "--out", "R", "--steps", "-5"], "steps must be >= 1"),
    (["train", "--data", "D", "--out", "R", "--max-wallclock", "-1"], "max_wallclock must be >= 0"),
    (["train", "--data", "D", "--out", "R", "--warmup-steps", "-1"], "warmup_steps must be >= 0"),
    (["train", "--data", "D", "--out", "R", "--warmdown-steps", "-1"], "warmdown_steps must be >= 0"),
    (["train", "--data", "D", "--out", "R", "--checkpoint-every", "-1"], "checkpoint_every must be >= 0"),
    (["train", "--data", "D", "--out", "R", "--elbo-steps", "0"], "elbo_steps must be in [1, 1048576]"),
    (["train", "--data", "D", "--out", "R", "--vocab-size", "0"], "vocab_size must be in [2, 65533]"),
    (["train", "--data", "D", "--out", "R", "--vocab-size", "70000"], "vocab_size must be in [2, 65533]"),
    (["train", "--data", "D", "--out", "R", "--grad-clip", "0"], "grad_clip must be > 0"),
    (["train", "--data", "D", "--out", "R", "--num-heads", "0"], "num_heads must be in [1, 65536]"),
    (["train", "--data", "D", "--out", "R", "--seed", "-1"], "seed must be in [0, 4294967295]"),
    (["eval", "--run", "R", "--data", "D", "--elbo-steps", "0"], "--elbo-steps: must be >= 1"),
    (["eval", "--run", "R", "--data", "D", "--num-seqs", "-1"], "--num-seqs: must be >= 0"),
    (["eval", "--run", "R", "--data", "D", "--draws", "0"], "--draws: must be >= 1"),
    (["eval", "--run", "R", "--data", "D", "--batch-rows", "0"], "--batch-rows: must be >= 1"),
    (["eval", "--run", "R", "--data", "D", "--passes", "0"], "--passes: must be >= 1"),
    (["sample", "--run", "R", "--length", "1"], "--length: must be in [2, 1048576], got 1"),
    (["sample", "--run", "R", "--steps", "0"], "--steps: must be >= 1"),
    (["sample", "--run", "R", "--num", "0"], "--num: must be in [1, 1024], got 0"),
    (["sample", "--run", "R", "--temperature", "0"], "--temperature: must be > 0"),
    (["sample", "--run", "R", "--top-p", "1.5"], "--top-p: must be in (0, 1]"),
    (["sample", "--run", "R", "--top-p", "x"], "--top-p: expected a number in (0, 1]"),
    (["prepare", "--docs", "d", "--out", "D", "--vocab-size", "0"], "--vocab-size: must be in [5, 65533]"),
    (["prepare", "--docs", "d", "--out", "D", "--val-docs", "0"], "--val-docs: must be >= 1"),
    (["prepare", "--docs", "d", "--out", "D", "--shard-tokens", "0"], "--shard-tokens: must be >= 1"),
    (["export", "--run", "R", "--out", "A", "--small-numel", "-1"], "--small-numel: must be >= 0"),
    (["download", "--train-shards", "-1"], "--train-shards: must be >= 0"),
    (["ablate", "--param", "lr", "--values", "1", "--data", "D", "--out", "O", "--seeds", "1,-2"],
     "seed must be in [0, 4294967295]"),
    (["race", "--data", "D", "--out", "O", "--seeds", "1,x"], "seed: cannot read 'x'"),
]


@pytest.mark.parametrize("argv, named", BAD_FLAGS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD_FLAGS])
def test_bad_numeric_flag_is_one_line(argv, named, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert named in one_line_error(capsys, argv[0])
    assert not any(tmp_path.iterdir())  # refused before writing anything


def test_every_numeric_config_field_is_range_checked():
    numeric = {name for name, f in Config.__dataclass_fields__.items() if type(f.default) in (int, float)}
    assert numeric == set(RANGES)
    for name, (low, high, low_in, high_in) in RANGES.items():
        kind = type(getattr(Config(), name))
        outside = [low - 1 if low_in else low] + ([] if high == float("inf") else [high + 1 if high_in else high])
        for value in outside:
            with pytest.raises(ValueError) as err:
                Config(**{name: kind(value)})
            accepted = describe_range(low, high, low_in, high_in)
            assert str(err.value) == f"{name} must be {accepted}, got {kind(value)!r}"
    with pytest.raises(ValueError, match="lr must be > 0, got nan"):
        Config(lr=float("nan"))
    with pytest.raises(ValueError, match="steps must be int, got '5'"):
        Config(steps="5")
    for preset in ("seed", "record", "demo", "tiny"):
        build_config(preset, environ={})  # the presets pass


# ---------------------------------------------------------------- never overwrite a run

def test_train_onto_an_existing_run_refuses_and_changes_nothing(finished_run, data_dir, tmp_path, capsys):
    run = copy_of(finished_run, tmp_path / "R")
    before = files_of(run)
    capsys.readouterr()
    assert main(["train", "--data", str(data_dir), "--out", str(run), *TINY, "--steps", "1"]) == 2
    err = one_line_error(capsys, "train")
    assert str(run) in err and "--overwrite" in err and "model.pt" in err
    assert files_of(run) == before  # model.pt and metrics.jsonl byte-identical


def test_train_overwrite_replaces_the_run(finished_run, data_dir, tmp_path):
    run = copy_of(finished_run, tmp_path / "R")
    assert main(["train", "--data", str(data_dir), "--out", str(run), *TINY, "--steps", "3", "--no-eval",
                 "--overwrite"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]  # not appended to the old run's [1, 2]
    assert not (run / "checkpoint.pt").exists()  # the old run's checkpoint went too
    assert read_checkpoint(run / "model.pt")["step"] == 3
    assert (run / "train.log").read_text().count("stopped at step") == 1


def bad_magic_train_shards(data_dir: Path, dest: Path) -> Path:
    """A copy of the data folder whose train shards all have a bad magic word."""
    bad = copy_of(data_dir, dest)
    for shard in bad.glob("fineweb_train_*.bin"):
        raw = bytearray(shard.read_bytes())
        raw[:4] = (1).to_bytes(4, "little")
        shard.write_bytes(bytes(raw))
    return bad


@pytest.mark.parametrize("case", ["missing data", "missing tokenizer", "corrupt train shards"])
def test_train_overwrite_with_bad_input_keeps_the_old_run(case, finished_run, data_dir, tmp_path, capsys):
    """--overwrite deletes the old run only once the data and tokenizer open: bad input costs nothing."""
    run = copy_of(finished_run, tmp_path / "R")
    data, extra, named = str(data_dir), [], ""
    if case == "missing data":
        data = named = str(tmp_path / "nodata")
    elif case == "missing tokenizer":
        extra, named = ["--tokenizer", str(tmp_path / "nope.model")], str(tmp_path / "nope.model")
    else:
        data = str(bad_magic_train_shards(data_dir, tmp_path / "D"))
        named = str(Path(data) / "fineweb_train_")
    before = files_of(run)
    capsys.readouterr()
    assert main(["train", "--data", data, "--out", str(run), *TINY, "--steps", "2", "--no-eval",
                 "--overwrite", *extra]) == 2
    assert named in one_line_error(capsys, "train")
    assert files_of(run) == before


@pytest.mark.parametrize("case", ["missing docs", "missing tokenizer", "bad line late in the docs"])
def test_prepare_overwrite_with_bad_input_keeps_the_old_shards(case, data_dir, tmp_path, capsys):
    """prepare --overwrite clears the old shards only once the docs and tokenizer have been read."""
    out = copy_of(data_dir, tmp_path / "D")
    docs, tokenizer = data_dir.parent / "docs.jsonl", json.loads((out / "manifest.json").read_text())["tokenizer"]
    if case == "missing docs":
        docs = named = tmp_path / "nope.jsonl"
    elif case == "missing tokenizer":
        tokenizer = named = tmp_path / "nope.model"
    else:
        named = tmp_path / "docs.jsonl"
        named.write_bytes(docs.read_bytes() + b"not json\n")
        docs = named
    before = files_of(out)
    capsys.readouterr()
    assert main(["prepare", "--docs", str(docs), "--tokenizer", str(tokenizer), "--out", str(out),
                 "--val-docs", "10", "--overwrite"]) == 2
    assert str(named) in one_line_error(capsys, "prepare")
    assert files_of(out) == before


def test_resume_refuses_a_changed_config_json(finished_run, data_dir, tmp_path, capsys):
    run = copy_of(finished_run, tmp_path / "R")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "model_dim": 128}))
    before = files_of(run)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--data", str(data_dir), "--steps", "3"]) == 2
    err = one_line_error(capsys, "train")
    assert str(run / "config.json") in err and "model_dim" in err
    assert files_of(run) == before

    (run / "config.json").write_text(json.dumps({**config, "steps": 7}))  # a run-control field may differ
    assert main(["train", "--resume", str(run), "--data", str(data_dir), "--steps", "3", "--no-eval"]) == 0
    assert read_checkpoint(run / "model.pt")["step"] == 3


def test_a_run_from_before_a_new_config_field_still_resumes(finished_run, data_dir, tmp_path):
    """Fields added later (time_sampling) take their default, the behaviour that run had: its
    config.json without them agrees with the checkpoint."""
    run = copy_of(finished_run, tmp_path / "R")
    config = json.loads((run / "config.json").read_text())
    assert config.pop("time_sampling") == "antithetic"
    (run / "config.json").write_text(json.dumps(config))
    assert main(["train", "--resume", str(run), "--data", str(data_dir), "--steps", "3", "--no-eval"]) == 0
    assert read_checkpoint(run / "model.pt")["step"] == 3


def test_resume_refuses_fewer_steps_than_done_and_a_second_out(finished_run, data_dir, tmp_path, capsys):
    run = copy_of(finished_run, tmp_path / "R")
    before = files_of(run)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--data", str(data_dir), "--steps", "1", "--no-eval"]) == 2
    assert "saved at step 2; --steps 1 is fewer" in one_line_error(capsys, "train")
    assert main(["train", "--resume", str(run), "--out", str(tmp_path / "R2"), "--data", str(data_dir)]) == 2
    assert f"--out {tmp_path / 'R2'} is for a new run" in one_line_error(capsys, "train")
    assert main(["train", "--resume", str(run), "--overwrite", "--data", str(data_dir)]) == 2
    assert "--overwrite is for a new run: pass one of them" in one_line_error(capsys, "train")
    assert files_of(run) == before and not (tmp_path / "R2").exists()


def test_run_files_are_what_a_run_writes(finished_run):
    assert {"model.pt", "checkpoint.pt", "config.json", "metrics.jsonl", "train.log"} <= set(RUN_FILES)
    assert {p.name for p in finished_run.iterdir()} <= set(RUN_FILES)


# ---------------------------------------------------------------- prepare and the manifest

def test_prepare_refuses_a_used_folder_and_overwrite_replaces_its_shards(data_dir, tmp_path, capsys):
    docs = data_dir.parent / "docs.jsonl"
    tokenizer = json.loads((data_dir / "manifest.json").read_text())["tokenizer"]
    out = tmp_path / "D"
    base = ["prepare", "--docs", str(docs), "--tokenizer", tokenizer, "--out", str(out), "--val-docs", "10"]
    assert main([*base, "--shard-tokens", "10000"]) == 0
    many = sorted(p.name for p in out.glob("fineweb_train_*.bin"))
    assert len(many) > 3
    before = files_of(out)
    capsys.readouterr()
    assert main([*base, "--shard-tokens", "1000000"]) == 2
    err = one_line_error(capsys, "prepare")
    assert str(out) in err and "--overwrite" in err
    assert files_of(out) == before

    (out / "notes.txt").write_text("kept")
    assert main([*base, "--shard-tokens", "1000000", "--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("fineweb_train_*.bin")) == ["fineweb_train_000000.bin"]
    assert (out / "notes.txt").read_text() == "kept"  # only shards and manifest are replaced
    manifest = json.loads((out / "manifest.json").read_text())
    assert load_split(out, "train", 1024).size == manifest["train"]["tokens"]

    empty = tmp_path / "E"
    empty.mkdir()
    assert main([*base, "--out", str(empty)]) == 0  # an empty folder is fine (the last --out counts)


def test_a_stale_shard_beside_the_manifest_is_ignored(data_dir, tmp_path, capsys):
    data = copy_of(data_dir, tmp_path / "D")
    listed = json.loads((data / "manifest.json").read_text())["train"]["shards"]
    stale = data / "fineweb_train_999999.bin"
    write_shard(stale, np.full(5000, 1023, dtype=np.uint16))
    assert [p.name for p in shard_paths(data, "train")] == listed
    (data / "garbage").mkdir()
    shutil.copy(stale, data / "garbage" / stale.name)
    assert stale.name in [p.name for p in shard_paths(data / "garbage", "train")]  # no manifest: the glob

    (data / listed[1]).unlink()
    with pytest.raises(DataError) as err:
        shard_paths(data, "train")
    assert str(data / listed[1]) in str(err.value) and "\n" not in str(err.value)
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "R"), *TINY, "--steps", "1"]) == 2
    assert str(data / listed[1]) in one_line_error(capsys, "train")


def test_shards_changed_after_prepare_are_refused(data_dir, tmp_path, capsys):
    """A val shard rewritten after prepare (valid, but not what the manifest recorded) is not scored."""
    data = copy_of(data_dir, tmp_path / "D")
    val = shard_paths(data, "val")[0]
    write_shard(val, np.full(100, 5, dtype=np.uint16))
    with pytest.raises(DataError) as err:
        load_split(data, "val", 1024)
    assert str(data / "manifest.json") in str(err.value) and "its shards hold 100;" in str(err.value)

    train_shard = shard_paths(data, "train")[0]  # training checks the train split the same way
    write_shard(train_shard, np.full(30_000, 5, dtype=np.uint16))
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "R"), *TINY, "--steps", "1",
                 "--no-eval"]) == 2
    err = one_line_error(capsys, "train")
    assert str(data / "manifest.json") in err and "train tokens" in err


@pytest.mark.parametrize("text, named", [("{not json", "not a JSON manifest"),
                                         ('{"val": {"shards": []}}', '"tokenizer"'),
                                         ("[1, 2]", "not a JSON object")])
def test_bad_manifest_is_one_line(data_dir, tmp_path, capsys, text, named):
    data = copy_of(data_dir, tmp_path / "D")
    (data / "manifest.json").write_text(text)
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "R"), *TINY, "--steps", "1"]) == 2
    err = one_line_error(capsys, "train")
    assert str(data / "manifest.json") in err and named in err


def test_an_empty_val_shard_is_one_line(data_dir, tmp_path, capsys):
    data = copy_of(data_dir, tmp_path / "D")
    shard = shard_paths(data, "val")[0]
    write_shard(shard, np.zeros(0, dtype=np.uint16))
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "R"), *TINY, "--steps", "1"]) == 2
    err = one_line_error(capsys, "train")
    assert str(shard) in err and "no tokens" in err


def test_prepare_library_checks_vocab_size(data_dir, tmp_path):
    with pytest.raises(DataError, match=r"--vocab-size must be in \[5, 65533\], got 0"):
        prepare(data_dir.parent / "docs.jsonl", tmp_path / "D", None, vocab_size=0)
    assert not (tmp_path / "D").exists()


# ---------------------------------------------------------------- OS errors: one line naming the file

def test_output_under_a_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "a"}\n' * 3)
    assert main(["prepare", "--docs", str(docs), "--out", str(blocker / "D"), "--val-docs", "1"]) == 2
    assert str(blocker / "D") in one_line_error(capsys, "prepare")
    assert main(["train", "--data", str(tmp_path), "--tokenizer", "t.model", "--out", str(blocker / "R"),
                 *TINY]) == 2
    assert str(blocker / "R") in one_line_error(capsys, "train")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_permission_denied_is_one_line(data_dir, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["prepare", "--docs", str(data_dir.parent / "docs.jsonl"), "--out", str(locked / "D"),
                     "--val-docs", "10"]) == 2
        err = one_line_error(capsys, "prepare")
    finally:
        locked.chmod(0o700)
    assert str(locked / "D") in err and "ermission denied" in err


def test_disk_full_is_one_line_naming_the_file(data_dir, tmp_path, monkeypatch, capsys):
    def full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path.with_name(f".{path.name}.tmp123")))

    monkeypatch.setattr(mdlm_golf.data.shards, "write_text_atomic", full)
    tokenizer = json.loads((data_dir / "manifest.json").read_text())["tokenizer"]
    out = tmp_path / "D"
    assert main(["prepare", "--docs", str(data_dir.parent / "docs.jsonl"), "--tokenizer", tokenizer,
                 "--out", str(out), "--val-docs", "10"]) == 2
    assert one_line_error(capsys, "prepare") == (f"mdlm-golf prepare: error: {out / 'manifest.json'}: "
                                                 f"{os.strerror(errno.ENOSPC)}")


# ---------------------------------------------------------------- Ctrl-C

def test_keyboard_interrupt_in_a_command_exits_130(monkeypatch, tmp_path, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mdlm_golf.cli, "prepare", interrupted)
    assert main(["prepare", "--docs", "d", "--out", str(tmp_path / "D")]) == 130
    assert capsys.readouterr().err == "mdlm-golf prepare: interrupted\n"


def test_ctrl_c_while_the_command_starts_up_is_one_line(capsys):
    """SIGINT during the CLI's imports (torch) is held back, then reported as an interrupt, exit 130."""
    def import_then_ctrl_c(name, *args, **kwargs):
        if name == "cli":  # console imports `from .cli import main`: interrupt in the middle of it
            os.kill(os.getpid(), signal.SIGINT)
        return real_import(name, *args, **kwargs)

    real_import = __builtins__["__import__"] if isinstance(__builtins__, dict) else __builtins__.__import__
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN, not the default, when the suite runs under nohup
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("builtins.__import__", import_then_ctrl_c)
        code = console_main(["train", "--data", "D", "--out", "R"])
    assert code == 130
    assert capsys.readouterr().err == "mdlm-golf train: interrupted\n"
    assert signal.getsignal(signal.SIGINT) is before  # restored for the command


def interrupt_at(monkeypatch, step: int, times: int) -> None:
    """Make train_step send this process SIGINT `times` times during 0-based step `step`."""
    original = mdlm_golf.train.loop.train_step

    def ctrl_c(*args, **kwargs):
        loss = original(*args, **kwargs)
        if args[6] == step:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(mdlm_golf.train.loop, "train_step", ctrl_c)


def test_ctrl_c_in_training_checkpoints_like_sigterm(data_dir, shared_tokenizer_path, tmp_path, monkeypatch):
    interrupt_at(monkeypatch, step=2, times=1)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    cfg = build_config("tiny", environ={}, overrides={"steps": 10, "log_every": 1})
    summary = train(cfg, data_dir, tmp_path / "R", shared_tokenizer_path, device=CPU)
    assert summary["steps"] == 3 and summary["stop_reason"].startswith("SIGINT")
    assert read_checkpoint(tmp_path / "R" / "checkpoint.pt")["step"] == 3
    assert not (tmp_path / "R" / "model.pt").exists()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # restored


def test_a_second_ctrl_c_aborts(data_dir, tmp_path, monkeypatch, capsys):
    interrupt_at(monkeypatch, step=1, times=2)
    run = tmp_path / "R"
    assert main(["train", "--data", str(data_dir), "--out", str(run), *TINY, "--steps", "10"]) == 130
    assert capsys.readouterr().err == "mdlm-golf train: interrupted\n"
    assert not (run / "model.pt").exists() and not (run / "checkpoint.pt").exists()


# ---------------------------------------------------------------- data on stdout, diagnostics on stderr

def test_sample_text_on_stdout_timing_on_stderr(finished_run, capsys):
    capsys.readouterr()
    assert main(["sample", "--run", str(finished_run), "--length", "16", "--steps", "4", "--num", "2"]) == 0
    out, err = capsys.readouterr()
    assert out.count("--- sample ") == 2 and "tokens generated" not in out
    assert err.startswith("--- ") and "tokens generated in" in err and err.count("\n") == 1
