"""Nothing executed, nothing corrupt accepted: weights-only checkpoints, checksums over every byte of
checkpoints and artifacts, finite weights and eval results, no stale temporaries after a killed write."""
from __future__ import annotations

import io
import os
import pickle
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import clean_env, synthetic_byte_table, synthetic_val, zipf_unigram
import torch

from mdlm_golf.artifact import load_artifact
from mdlm_golf.artifact.fileformat import HEADER, MAGIC, ArtifactError, encode_artifact, read_meta, seal_artifact
from mdlm_golf.artifact.quant import QuantTensor, spec_quantizer
from mdlm_golf.checkpoint import (
    COMMENT_BYTES, FORMAT, CheckpointError, load_model, read_checkpoint, save_checkpoint, seal_file,
)
from mdlm_golf.config import build_config
from mdlm_golf.data.shards import write_shard
from mdlm_golf.eval import evaluate
from mdlm_golf.files import atomic_path, write_bytes_atomic
from mdlm_golf.data.loader import ShardedLoader
from mdlm_golf.model import Transformer
from mdlm_golf.train.optim import WeightEMA, build_optimizer

CPU = torch.device("cpu")


def tiny(**overrides):
    return build_config("tiny", environ={}, overrides=overrides)


def tiny_model(cfg=None, seed: int = 0) -> Transformer:
    """A tiny MDLM with every weight nonzero (the head starts at zero)."""
    cfg = cfg or tiny()
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def refused(path: Path, error=CheckpointError, match: str | None = None) -> str:
    """Loading `path` raises `error` with one line that names the file; the message."""
    load = load_model if error is CheckpointError else load_artifact
    with pytest.raises(error, match=match) as e:
        load(path)
    message = str(e.value)
    assert str(path) in message and "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    model = tiny_model()
    save_checkpoint(path, model, model.cfg, step=3, tokenizer="tok.model")
    return path.read_bytes()


# ---------------------------------------------------------------- nothing executed

class RunsCode:
    """Unpickling this calls os.system: what a crafted checkpoint.pt would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_checkpoint_is_refused_and_nothing_in_it_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = {"format": FORMAT, "model": {}, "payload": RunsCode(marker)}
    raw = tmp_path / "raw.pt"  # a plain pickle, as torch.save(_use_new_zipfile_serialization=False) wrote
    raw.write_bytes(pickle.dumps(evil))
    sealed = tmp_path / "sealed.pt"  # torch's zip with a valid checksum: only weights-only loading stops it
    torch.save(evil, sealed)
    seal_file(sealed)

    refused(raw, match="not an mdlm-golf checkpoint")
    assert "posix.system" in refused(sealed, match="not a weights-only checkpoint")
    with pytest.raises(CheckpointError):
        read_checkpoint(sealed)
    assert not marker.exists()
    pickle.loads(raw.read_bytes())  # the payload is live: unpickled the old way, it runs
    assert marker.exists()


@pytest.mark.parametrize("kind", ["random bytes", "empty", "zip", "sealed zip", "sealed list", "old format"])
def test_foreign_files_are_one_line_errors(tmp_path, kind):
    """Random bytes, an empty file, a zip that is not torch's, a sealed file of the wrong shape, an old file."""
    path = tmp_path / "model.pt"
    buffer = io.BytesIO()
    if kind.endswith("zip"):
        with zipfile.ZipFile(buffer, "w") as z:
            z.writestr("notes.txt", "not a checkpoint")
    elif kind == "sealed list":
        torch.save([torch.zeros(3)], buffer)
    elif kind == "old format":  # what this code saved before checkpoints carried a checksum
        torch.save({"format": FORMAT, "config": tiny().to_dict(), "model": tiny_model().state_dict()}, buffer)
    content = {"random bytes": np.random.default_rng(0).bytes(4096), "empty": b""}.get(kind, buffer.getvalue())
    path.write_bytes(content)
    if kind.startswith("sealed"):
        seal_file(path)
    message = refused(path)
    expected = {"sealed zip": "not a weights-only checkpoint", "sealed list": "not an mdlm-golf checkpoint",
                "zip": "without an mdlm-golf checksum", "old format": "without an mdlm-golf checksum"}
    assert expected.get(kind, "not an mdlm-golf checkpoint") in message


# ---------------------------------------------------------------- checksums

def test_checkpoint_is_a_plain_zip_that_round_trips(tmp_path, checkpoint_bytes):
    path = tmp_path / "model.pt"
    path.write_bytes(checkpoint_bytes)
    model, cfg, state = load_model(path)
    want = tiny_model().state_dict()
    assert state["step"] == 3 and state["tokenizer"] == "tok.model" and cfg == tiny()
    assert all(torch.equal(model.state_dict()[name], t) for name, t in want.items())
    assert zipfile.ZipFile(path).comment.startswith(b"mdlm-golf-checkpoint")  # zip tools read it
    assert torch.equal(torch.load(path, weights_only=True)["model"]["head.weight"], want["head.weight"])


@pytest.mark.parametrize("where", ["first", "member header", "pickle", "weights", "zip end", "comment length",
                                   "digest"])
def test_a_flipped_bit_anywhere_in_a_checkpoint_is_refused(tmp_path, checkpoint_bytes, where):
    data = bytearray(checkpoint_bytes)
    weights = checkpoint_bytes.find(tiny_model().state_dict()["head.weight"].numpy().tobytes()[:64])
    at = {"first": 0, "member header": checkpoint_bytes.find(b"data.pkl") + 20,
          "pickle": checkpoint_bytes.find(FORMAT.encode()) + 3, "weights": weights + 17,
          "zip end": len(data) - COMMENT_BYTES - 10, "comment length": len(data) - COMMENT_BYTES - 1,
          "digest": len(data) - 1}[where]
    assert weights > 0 and at >= 0
    data[at] ^= 0x04
    path = tmp_path / "model.pt"
    path.write_bytes(bytes(data))
    refused(path, match="checksum mismatch")


def test_full_training_state_loads_weights_only(tmp_path):
    """What train saves (AdamW + Muon, EMA, loader position, RNG) is plain enough for weights_only."""
    cfg = tiny(optimizer="muon", ema=0.9)
    model = tiny_model(cfg).train()
    optimizer, ema = build_optimizer(model, cfg, CPU), WeightEMA(model, cfg.ema)
    sum(p.square().sum() for p in model.parameters()).backward()
    optimizer.step()
    ema.update()
    for i in range(2):
        write_shard(tmp_path / f"fineweb_train_00000{i}.bin", np.arange(3000, dtype=np.uint16) % 1000)
    loader = ShardedLoader(str(tmp_path / "fineweb_train_*.bin"), cfg.seq_len, cfg.layout, cfg.tokens.pad,
                           cfg.vocab_size, cfg.seed, shards_per_group=1)
    path, rng = tmp_path / "checkpoint.pt", torch.get_rng_state()
    save_checkpoint(path, model, cfg, step=1, train_seconds=0.5, world_size=1, optimizer=optimizer.state_dict(),
                    loader=loader.state_dict(), ema=ema.state_dict(), rng={"torch": rng}, tokenizer="tok.model")
    state = read_checkpoint(path)
    assert set(state["optimizer"]) == {"adamw", "muon"} and state["ema"]["updates"] == 1
    build_optimizer(Transformer(cfg), cfg, CPU).load_state_dict(state["optimizer"])
    loader.load_state_dict(state["loader"])
    loader.close()
    assert torch.equal(state["rng"]["torch"], rng)


def int8_tensors(model: Transformer) -> list[QuantTensor]:
    """The model's weights in int8 as the export stores them (block matrices too: small_numel 1000)."""
    return spec_quantizer(model.state_dict(), model.cfg, small_numel=1000)("int8")


@pytest.fixture(scope="module")
def artifact_bytes() -> bytes:
    model = tiny_model()
    return encode_artifact(int8_tensors(model), model.cfg, "int8", compressor="zlib")[0]


def test_a_changed_byte_in_artifact_metadata_is_refused(tmp_path, artifact_bytes):
    at = artifact_bytes.find(b'"seq_len":') + len(b'"seq_len":')
    data = bytearray(artifact_bytes)
    data[at] = ord("9") if data[at] != ord("9") else ord("8")  # still valid JSON, a different seq_len
    path = tmp_path / "meta.mdz"
    path.write_bytes(bytes(data))
    refused(path, ArtifactError, "checksum mismatch")

    header = bytearray(artifact_bytes)
    header[len(MAGIC) + 2] ^= 0x01  # the metadata length
    path.write_bytes(bytes(header))
    refused(path, ArtifactError)
    path.write_bytes(artifact_bytes)
    assert load_artifact(path)[1] == tiny()


def test_an_old_version_artifact_is_a_clear_error(tmp_path, artifact_bytes):
    meta, payload = read_meta(Path("<memory>"), artifact_bytes)
    blob = artifact_bytes[HEADER.size:HEADER.size + HEADER.unpack_from(artifact_bytes)[2]]
    path = tmp_path / "old.mdz"
    path.write_bytes(HEADER.pack(MAGIC, 1, len(blob)) + blob + payload)  # version 1: no checksum trailer
    assert "export it again" in refused(path, ArtifactError, "unsupported artifact version 1")
    path.write_bytes(seal_artifact(HEADER.pack(MAGIC, 2, len(blob)) + blob + payload))
    assert load_artifact(path)[2]["payload_bytes"] == len(payload)


# ---------------------------------------------------------------- finite weights, finite results

def test_non_finite_weights_are_refused_on_load(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.head.weight.view(-1)[5] = float("inf")
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, model.cfg)
    assert "head.weight" in refused(path, match="not finite")

    qtensors = int8_tensors(tiny_model())
    small = next(qt for qt in qtensors if qt.format == "fp16")
    small.data.reshape(-1)[0] = np.nan  # stored as fp16 values: the NaN reaches the file as it is
    artifact = tmp_path / "nan.mdz"
    artifact.write_bytes(encode_artifact(qtensors, tiny(), "int8", compressor="zlib")[0])
    assert small.name in refused(artifact, ArtifactError, "not finite")


@pytest.mark.parametrize("objective", ["mdlm", "ar"])
def test_a_non_finite_eval_result_raises(objective):
    cfg = tiny(objective=objective, seq_len=32)
    model = tiny_model(cfg)
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))
    val = synthetic_val(4 * cfg.seq_len + 1, zipf_unigram(), seed=1)
    with pytest.raises(FloatingPointError, match=r"^\w+ bpb is nan: the model's weights or logits are not finite$"):
        evaluate(model, val, synthetic_byte_table(), cfg, steps=2, num_seqs=2, seed=0)


# ---------------------------------------------------------------- no stale temporaries

def test_a_temporary_left_by_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "checkpoint.pt"
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys\n"
        "from mdlm_golf.files import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    tmp.write_bytes(b'half a checkpoint')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"), str(target)], env=clean_env(), timeout=60)
    assert killed.returncode == -signal.SIGKILL
    leftovers = list(tmp_path.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".checkpoint.pt.tmp"), leftovers
    stale = leftovers[0]
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as live:
        writing = tmp_path / f".checkpoint.pt.tmp{live.pid}"  # a writer still at work: left alone
        writing.write_bytes(b"in progress")
        (tmp_path / ".checkpoint.pt.tmpnotes").write_bytes(b"not ours")  # not a pid: not ours to remove
        write_bytes_atomic(target, b"whole")
        remaining = sorted(p.name for p in tmp_path.iterdir())
        live.kill()
    assert remaining == sorted(["checkpoint.pt", writing.name, ".checkpoint.pt.tmpnotes"]), remaining
    assert target.read_bytes() == b"whole" and not stale.exists()
    with atomic_path(target) as tmp:  # its writer is gone now: this write removes its temporary too
        tmp.write_bytes(b"again")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".checkpoint.pt.tmpnotes", "checkpoint.pt"]
