"""Hostile input, one test per class (issue 23): a full disk, sizes read from files, signals in a race, text
that is not UTF-8, writes onto a run's own files. Each ends in one stderr line naming the file or field,
loses nothing and allocates nothing a file only claims."""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import clean_env, small_data

import mdlm_golf.files
from mdlm_golf.artifact.fileformat import HEADER, seal_artifact
from mdlm_golf.checkpoint import read_checkpoint, save_checkpoint
from mdlm_golf.cli import main
from mdlm_golf.coder import Header
from mdlm_golf.config import build_config
from mdlm_golf.experiments.race_recipes import flops_per_token
from mdlm_golf.model import Transformer, parameter_shapes
from mdlm_golf.subtokens import digit_code

TIMEOUT = 240


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, shared_docs_path, shared_tokenizer_path) -> Path:
    return small_data(tmp_path_factory.mktemp("hostile"), shared_docs_path, shared_tokenizer_path, 300,
                      val_docs=10, shard_tokens=20_000)


@pytest.fixture(scope="module")
def run(data_dir) -> Path:
    """A finished tiny run (model.pt, config.json, logs)."""
    folder = data_dir.parent / "RUN"
    assert main(["train", "--data", str(data_dir), "--out", str(folder), "--preset", "tiny", "--steps", "3",
                 "--no-eval"]) == 0
    return folder


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- a full disk

@pytest.fixture(params=["1m"])
def small_disk(tmp_path, request) -> Path:
    """A small tmpfs (1 MiB unless the test's parameter says), where this machine lets the test mount one
    (root on Linux), else skip."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={request.param}", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a small filesystem here (the ENOSPC injection tests still run)")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_full_disk_is_one_line_keeps_the_previous_checkpoint_and_no_temporary(data_dir, small_disk, capsys):
    out = small_disk / "R"
    args = ["train", "--data", str(data_dir), "--out", str(out), "--preset", "tiny", "--model-dim", "128",
            "--num-heads", "2", "--steps", "60", "--checkpoint-every", "1", "--no-eval"]
    assert main(args) == 2
    line = one_line(capsys)
    assert "No space left on device" in line and str(out) in line
    assert not [p for p in out.iterdir() if ".tmp" in p.name]  # no temporary left behind
    if (out / "checkpoint.pt").exists():  # the previous version, whole
        assert read_checkpoint(out / "checkpoint.pt")["step"] >= 1


@pytest.mark.parametrize("small_disk", ["256k"], indirect=True)
def test_prepare_overwrite_on_a_full_disk_keeps_the_old_data_folder(small_disk, shared_docs_path,
                                                                    shared_tokenizer_path, tmp_path, capsys):
    """The new shards are written beside the old ones and replace them only once whole."""
    folder = small_data(small_disk, shared_docs_path, shared_tokenizer_path, 30, val_docs=5, shard_tokens=4000)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    capsys.readouterr()
    assert main(["prepare", "--docs", str(shared_docs_path), "--tokenizer", str(shared_tokenizer_path),
                 "--out", str(folder), "--val-docs", "5", "--shard-tokens", "4000", "--overwrite"]) == 2
    line = one_line(capsys)
    assert "No space left on device" in line and str(folder) in line
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing lost, no temporary left


@pytest.mark.parametrize("small_disk", ["3m"], indirect=True)
def test_train_overwrite_on_a_full_disk_gives_the_old_run_back(data_dir, small_disk, capsys):
    """The old run is set aside (renames) and deleted only once the new one has its model."""
    out = small_disk / "R"
    args = ["train", "--data", str(data_dir), "--out", str(out), "--preset", "tiny", "--steps", "2", "--no-eval"]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main([*args, "--model-dim", "256", "--overwrite"]) == 2  # its weights do not fit
    assert "No space left on device" in one_line(capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing lost, no temporary left


@pytest.mark.parametrize("command", ["export", "compress", "checkpoint"])
def test_injected_enospc_names_the_file_and_leaves_no_temporary(run, tmp_path, monkeypatch, capsys, command):
    """Where no filesystem can be mounted: a write that fails with ENOSPC (the OSError Python raises, and
    what torch.save meets in its file object) ends in one line naming the target."""
    real_write = os.write
    text = tmp_path / "in.txt"
    text.write_text("a short text to compress")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "out.bin"
    if command == "checkpoint":
        monkeypatch.setattr(mdlm_golf.checkpoint.torch, "save", lambda obj, f: f.write(b"x" * 10) and full_disk())
        cfg = build_config("tiny", environ={})
        with pytest.raises(OSError) as caught:
            save_checkpoint(target, Transformer(cfg), cfg)
        assert caught.value.errno == errno.ENOSPC and str(target) in str(caught.value)
    else:
        monkeypatch.setattr(mdlm_golf.files.Path, "write_bytes", lambda self, data: full_disk())
        argv = (["export", "--run", str(run), "--out", str(target), "--quant", "int8", "--compressor", "zlib"]
                if command == "export" else ["compress", "--run", str(run), str(text), str(target)])
        assert main(argv) == 2
        assert "No space left on device" in one_line(capsys)
    assert real_write is os.write and not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    assert not target.exists()


# ---------------------------------------------------------------- sizes read from files

@pytest.mark.parametrize("change, said", [(dict(num_tokens=2**44), "claims 17,592,186,044,416 tokens"),
                                          (dict(seq_len=2**40), "slices of 1,099,511,627,776 tokens")])
def test_an_mdz_header_claiming_a_size_its_code_or_model_cannot_have(run, tmp_path, capsys, change, said):
    text, packed = tmp_path / "t.txt", tmp_path / "t.mdz"
    text.write_text("tokens, counted honestly")
    assert main(["compress", "--run", str(run), str(text), str(packed)]) == 0
    data = packed.read_bytes()
    header, rest = Header.decode(data)
    crafted = dataclasses.replace(header, **change).encode() + rest  # its CRC recomputed
    packed.write_bytes(crafted)
    capsys.readouterr()
    assert main(["decompress", "--run", str(run), str(packed), str(tmp_path / "back.txt")]) == 2
    line = one_line(capsys)
    assert said in line and str(packed) in line


@pytest.mark.parametrize("change, named", [(dict(seq_len=10**12), "seq_len"), (dict(num_layers=1000), "weights"),
                                           (dict(model_dim=4096, num_heads=8), "weights")])
def test_an_artifact_whose_config_claims_a_huge_model(run, data_dir, tmp_path, capsys, change, named):
    """Re-sealed with a valid CRC: the config's ranges, then its model's shapes (on the meta device)
    against the tensors the file holds, refuse it before anything is allocated."""
    artifact = tmp_path / "a.mdlm"
    assert main(["export", "--run", str(run), "--out", str(artifact), "--quant", "int8", "--compressor", "zlib"]) == 0
    data = artifact.read_bytes()
    magic, version, meta_len = HEADER.unpack_from(data)
    meta = json.loads(data[HEADER.size:HEADER.size + meta_len])
    meta["config"].update(change)
    meta_bytes = json.dumps(meta).encode()
    payload = data[HEADER.size + meta_len:-4]
    artifact.write_bytes(seal_artifact(HEADER.pack(magic, version, len(meta_bytes)) + meta_bytes + payload))
    capsys.readouterr()
    assert main(["eval", "--artifact", str(artifact), "--data", str(data_dir), "--num-seqs", "2"]) == 2
    line = one_line(capsys)
    assert named in line and str(artifact) in line


def test_a_checkpoint_whose_config_claims_a_huge_model(run, tmp_path, capsys):
    state = torch.load(run / "model.pt", weights_only=True)
    cfg = build_config("tiny", environ={}, overrides=dict(num_layers=1000, model_dim=4096, num_heads=8))
    path = tmp_path / "model.pt"
    small = Transformer(build_config("tiny", environ={}))
    small.load_state_dict(state["model"])
    save_checkpoint(path, small, cfg)  # sealed: the checksum is valid, the config is not its weights'
    assert main(["sample", "--run", str(tmp_path), "--num", "1", "--length", "8", "--tokenizer", "x"]) == 2
    line = one_line(capsys)
    assert "weights do not match its config" in line and str(path) in line


@pytest.mark.parametrize("kind", [dict(), dict(block_size=2), dict(block_size=2, decoder_layers=1),
                                  dict(block_size=2, decoder_layers=1, decoder_tied=True),
                                  dict(subtokens=2, subtoken_merge="concat"), dict(objective="ar")])
def test_the_shape_check_builds_every_model_kind_on_the_meta_device(kind):
    """The check that runs before any weights load (and the race's FLOP count) must work for every kind."""
    cfg = build_config("tiny", environ={}, overrides=kind)
    digit_code.cache_clear()  # the meta build comes first, as in a race, with nothing cached
    shapes, flops = parameter_shapes(cfg), flops_per_token(cfg)
    assert shapes == {name: tuple(t.shape) for name, t in Transformer(cfg).state_dict().items()}
    assert flops == Transformer(cfg).flops_per_token()


# ---------------------------------------------------------------- signals in a race

def test_sigterm_in_a_race_checkpoints_writes_no_summary_and_a_rerun_resumes(data_dir, tmp_path):
    out = tmp_path / "RACE"
    argv = [sys.executable, "-m", "mdlm_golf", "race", "--data", str(data_dir), "--out", str(out), "--preset", "tiny",
            "--steps", "400", "--log-every", "1", "--seeds", "1", "--recipes", "today", "--eval-num-seqs", "2"]
    log = tmp_path / "race.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, env=clean_env(), stdout=f, stderr=subprocess.STDOUT)
    run_dir = out / "runs" / "today_seed=1"
    deadline = time.monotonic() + TIMEOUT
    while not (run_dir / "metrics.jsonl").is_file() or (run_dir / "metrics.jsonl").read_text().count("\n") < 5:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(TIMEOUT) == 143, log.read_text()[-2000:]
    last = log.read_text().strip().splitlines()[-1]
    assert last.startswith("mdlm-golf race: interrupted: SIGTERM") and "checkpoint.pt" in last
    assert (run_dir / "checkpoint.pt").is_file() and not (run_dir / "train_summary.json").exists()
    done = subprocess.run(argv, env=clean_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in (run_dir / "train.log").read_text()
    assert json.loads((run_dir / "train_summary.json").read_text())["steps"] == 400


@pytest.mark.parametrize("config_text", ["[1, 2]", "{not json"])
def test_a_finished_runs_bad_config_json_is_one_line_naming_it(data_dir, tmp_path, capsys, config_text):
    out = tmp_path / "RACE"
    argv = ["race", "--data", str(data_dir), "--out", str(out), "--preset", "tiny", "--steps", "2", "--seeds", "1",
            "--recipes", "today", "--eval-num-seqs", "2", "--elbo-steps", "2"]
    assert main(argv) == 0
    config = out / "runs" / "today_seed=1" / "config.json"
    config.write_text(config_text)
    capsys.readouterr()
    assert main(argv) == 2
    assert str(config) in one_line(capsys)


def test_submission_writes_its_record_folder_whole_or_not_at_all(run, data_dir, tmp_path, capsys):
    artifact, records = tmp_path / "a.mdlm", tmp_path / "records" / "r"
    assert main(["export", "--run", str(run), "--out", str(artifact), "--quant", "int8", "--compressor", "zlib"]) == 0
    broken = tmp_path / "BROKEN"
    broken.mkdir()
    (broken / "config.json").write_text("[]")
    argv = ["submission", "--artifact", str(artifact), "--data", str(data_dir), "--out", str(records), "--name", "n",
            "--github-id", "g", "--num-seqs", "2", "--elbo-steps", "2"]
    capsys.readouterr()
    assert main([*argv, "--run", str(broken)]) == 2
    assert str(broken / "config.json") in one_line(capsys) and not records.exists()
    assert not list(records.parent.glob("*")) if records.parent.exists() else True  # no partial, no temporary
    assert main([*argv, "--run", str(run)]) == 0 and (records / "submission.json").is_file()
    assert main([*argv, "--run", str(run)]) == 2 and "--overwrite" in one_line(capsys)
    assert main([*argv, "--run", str(run), "--out", str(run)]) == 2  # never onto the run it reads


# ---------------------------------------------------------------- text that is not UTF-8

def test_a_prompt_that_is_not_utf8_is_one_line(run, capsys):
    prompt = os.fsdecode(b"caf\xe9 \xff")  # what a shell hands over: surrogate escapes
    assert main(["sample", "--run", str(run), "--prompt", prompt, "--num", "1", "--length", "8"]) == 2
    line = one_line(capsys)
    assert "--prompt" in line and "not valid UTF-8" in line


# ---------------------------------------------------------------- writes onto a run, and small things

def test_no_command_writes_onto_a_file_of_the_run_it_reads(run, tmp_path, capsys):
    before = snapshot(run)
    for flags in ([], ["--overwrite"]):
        assert main(["export", "--run", str(run), "--out", str(run / "model.pt"), "--quant", "int8",
                     "--compressor", "zlib", *flags]) == 2
        assert str(run / "model.pt") in one_line(capsys)
    assert main(["compress", "--run", str(run), str(run / "config.json"), str(run / "train.log"), "--overwrite"]) == 2
    assert "reads" in one_line(capsys)
    assert snapshot(run) == before


def test_an_unknown_recipe_field_says_so_and_lists_the_fields(data_dir, tmp_path, capsys):
    assert main(["race", "--data", str(data_dir), "--out", str(tmp_path / "R"), "--preset", "tiny",
                 "--recipe", "x:nosuch_field=1"]) == 2
    line = one_line(capsys)
    assert "unknown config field 'nosuch_field'" in line and "num_layers" in line


def test_sigterm_during_export_is_one_line_within_a_second(tmp_path):
    """The long C calls (quantizing, compressing) run off the main thread, so the signal is handled at
    once: one line, exit 143, whatever the compressor is in the middle of."""
    cfg = build_config("tiny", environ={}, overrides=dict(num_layers=8, model_dim=512, num_heads=8, seq_len=256))
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        model.head.weight.normal_(std=0.02)
    (tmp_path / "R").mkdir()
    save_checkpoint(tmp_path / "R" / "model.pt", model, cfg)
    argv = [sys.executable, "-m", "mdlm_golf", "export", "--run", str(tmp_path / "R"), "--out",
            str(tmp_path / "a.mdlm"), "--compressor", "best", "--quant", "int8", "--allow-oversize"]
    proc = subprocess.Popen(argv, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(10)  # torch imported, the export under way (a signal during the import is one line too)
    assert proc.poll() is None, "the export ended before the signal: make the model larger"
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert time.monotonic() - began < 1.5 and proc.returncode == 143
    assert err.strip().splitlines()[-1] == "mdlm-golf export: terminated (SIGTERM)"
