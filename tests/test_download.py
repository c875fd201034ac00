"""mdlm_golf.data.download against a local fake Hub (tests/hub_server.py); nothing touches the network."""
from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("huggingface_hub")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import FakeHub  # noqa: E402

from mdlm_golf.data.shards import DataError, read_shard, write_shard  # noqa: E402
from mdlm_golf.data.download import DownloadError, download  # noqa: E402

REPO = "fake-org/parameter-golf"
ROOT = "datasets"
DS = "fineweb10B_sp1024"
TOKENIZER = Path(__file__).resolve().parent / "fixtures" / "fineweb_1024_bpe.model"  # the challenge's, copied


def remote(*parts: str) -> str:
    return "/".join((ROOT, *parts))


def shard_remote(split: str, i: int) -> str:
    return remote("datasets", DS, f"fineweb_{split}_{i:06d}.bin")


def make_manifest(files_train: int = 3, files_val: int = 1) -> bytes:
    """The shape the challenge's export writes (export_matched_fineweb_tokenizer_datasets.py)."""
    manifest = {
        "version": "10B",
        "shard_size": 100_000_000,
        "tokenizers": [{"name": "sp_bpe_1024", "kind": "sentencepiece_bpe", "vocab_size": 1024, "bos_id": 1,
                        "eos_id": 2, "model_path": "tokenizers/fineweb_1024_bpe.model",
                        "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}],
        "datasets": [{"name": DS, "tokenizer_name": "sp_bpe_1024", "tokenizer_kind": "sentencepiece_bpe",
                      "path": f"datasets/{DS}", "vocab_size": 1024, "bos_id": 1, "eos_id": 2,
                      "stats": {"files_train": files_train, "files_val": files_val}}],
    }
    return json.dumps(manifest, indent=2).encode()


@pytest.fixture
def hub(tmp_path_factory):
    hub = FakeHub().start()
    repo = hub.add_repo(REPO)
    work = tmp_path_factory.mktemp("hubfiles")
    rng = np.random.default_rng(0)
    for split, count in (("val", 1), ("train", 3)):
        for i in range(count):
            path = work / f"{split}{i}.bin"
            write_shard(path, rng.integers(0, 1024, size=3000 + 100 * i))
            repo.files[shard_remote(split, i)] = path.read_bytes()
    model = TOKENIZER.read_bytes()
    repo.files[remote("tokenizers", "fineweb_1024_bpe.model")] = model
    repo.files[remote("tokenizers", "fineweb_1024_bpe.vocab")] = b"<pad>\t0\n<s>\t0\n</s>\t0\n<unk>\t0\n"
    repo.files[remote("manifest.json")] = make_manifest()
    yield hub
    hub.stop()


@pytest.fixture(autouse=True)
def hf_env(monkeypatch, tmp_path, hub):
    """HF caches under tmp_path, offline mode off, telemetry off, no token, endpoint = the fake Hub."""
    import huggingface_hub.constants as constants

    home = tmp_path / "hf_home"
    for name, value in {"HF_HOME": home, "HF_HUB_CACHE": home / "hub", "HF_HUB_DISABLE_TELEMETRY": "1",
                        "HF_ENDPOINT": hub.endpoint, "MATCHED_FINEWEB_REPO_ID": REPO,
                        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}.items():
        monkeypatch.setenv(name, str(value))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                 "MATCHED_FINEWEB_REMOTE_ROOT_PREFIX"):
        monkeypatch.delenv(name, raising=False)
    # huggingface_hub reads these at import time, so patch the module constants too.
    for name, value in {"HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
                        "HUGGINGFACE_HUB_CACHE": str(home / "hub"), "HF_HUB_OFFLINE": False,
                        "HF_HUB_DISABLE_TELEMETRY": True, "HF_TOKEN_PATH": str(home / "token"),
                        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens")}.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)


def expected_files(out: Path, train: int) -> list[Path]:
    data = out / "datasets" / DS
    return ([out / "manifest.json", data / "fineweb_val_000000.bin"]
            + [data / f"fineweb_train_{i:06d}.bin" for i in range(train)]
            + [out / "tokenizers" / "fineweb_1024_bpe.model", out / "tokenizers" / "fineweb_1024_bpe.vocab"])


def assert_no_leftovers(out: Path) -> None:
    assert not list(out.glob(".download-*")), "staging folder left behind"
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or p.name.endswith(".incomplete")]


def test_downloads_challenge_layout_then_skips_everything(hub, tmp_path):
    out = tmp_path / "data"
    paths = download(out, "sp1024", 2, progress=False)  # repo id from $MATCHED_FINEWEB_REPO_ID

    assert paths == expected_files(out, 2)
    files = hub.repos[REPO].files
    for path in paths:
        rel = path.relative_to(out).as_posix()
        assert path.read_bytes() == files[remote(rel)], rel
    assert not (out / "datasets" / DS / "fineweb_train_000002.bin").exists()
    assert read_shard(out / "datasets" / DS / "fineweb_val_000000.bin", 1024).size == 3000
    assert sorted(hub.gets(".bin")) == sorted([shard_remote("val", 0), shard_remote("train", 0),
                                               shard_remote("train", 1)])
    assert len(hub.gets()) == 6  # manifest + 3 shards + 2 tokenizer files
    assert_no_leftovers(out)

    hub.clear_log()
    assert download(out, "sp1024", 2, progress=False) == paths
    assert hub.gets() == []  # nothing downloaded the second time
    assert hub.requests == []  # not even a HEAD: everything local was complete


def test_truncated_local_shard_is_downloaded_again(hub, tmp_path):
    out = tmp_path / "data"
    download(out, "sp1024", 2, progress=False)
    shard = out / "datasets" / DS / "fineweb_train_000001.bin"
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 2])
    (out / "tokenizers" / "fineweb_1024_bpe.vocab").write_bytes(b"")  # empty = incomplete

    hub.clear_log()
    download(out, "sp1024", 2, progress=False)
    assert sorted(hub.gets()) == sorted([shard_remote("train", 1), remote("tokenizers", "fineweb_1024_bpe.vocab")])
    assert shard.read_bytes() == good
    assert_no_leftovers(out)


def test_corrupt_shard_from_server_is_an_error_and_not_kept(hub, tmp_path):
    bad = bytearray(hub.repos[REPO].files[shard_remote("train", 1)])
    bad[:4] = (12345).to_bytes(4, "little")  # bad magic, same size
    hub.repos[REPO].files[shard_remote("train", 1)] = bytes(bad)
    out = tmp_path / "data"

    with pytest.raises(DataError, match=r"fineweb_train_000001\.bin: downloaded file is corrupt \(bad magic") as info:
        download(out, "sp1024", 2, progress=False)
    assert "\n" not in str(info.value)
    assert len(hub.gets("fineweb_train_000001.bin")) == 2  # fetched afresh once before giving up
    assert not (out / "datasets" / DS / "fineweb_train_000001.bin").exists()
    assert (out / "datasets" / DS / "fineweb_train_000000.bin").is_file()  # good ones before it stay
    assert_no_leftovers(out)


def test_bad_manifest_from_server_is_not_kept(hub, tmp_path):
    hub.repos[REPO].files[remote("manifest.json")] = b"<html>not json</html>"
    out = tmp_path / "data"
    with pytest.raises(DataError, match=r"manifest\.json: downloaded file is corrupt \(not a JSON object"):
        download(out, "sp1024", 1, progress=False)
    assert not (out / "manifest.json").exists()
    assert_no_leftovers(out)


def test_more_train_shards_than_exist_is_a_clear_error(hub, tmp_path):
    out = tmp_path / "data"
    with pytest.raises(DownloadError, match=r"only 3 train shards.*asked for 5") as info:
        download(out, "sp1024", 5, repo_id=REPO, remote_root=ROOT, progress=False)
    assert "\n" not in str(info.value)
    assert hub.gets(".bin") == []


def test_unknown_variant_is_a_clear_error(hub, tmp_path):
    with pytest.raises(DownloadError, match=r"variant 'sp999'.*not in .*manifest\.json; available: sp1024"):
        download(tmp_path / "data", "sp999", 1, progress=False)
    assert hub.gets(".bin") == []


def test_stale_local_manifest_is_refreshed(hub, tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "manifest.json").write_bytes(make_manifest(files_train=1))
    download(out, "sp1024", 3, progress=False)
    assert json.loads((out / "manifest.json").read_text())["datasets"][0]["stats"]["files_train"] == 3
    assert (out / "datasets" / DS / "fineweb_train_000002.bin").is_file()


def test_foreign_manifest_is_not_overwritten(hub, tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "manifest.json").write_text('{"docs_source": "docs.jsonl", "train": {}, "val": {}}')
    with pytest.raises(DownloadError, match=r"manifest\.json: exists but is not a challenge export manifest"):
        download(out, "sp1024", 1, progress=False)
    assert json.loads((out / "manifest.json").read_text())["docs_source"] == "docs.jsonl"
    assert hub.requests == []


def test_missing_repo_and_remote_root_are_clear_errors(hub, tmp_path):
    hub.add_repo("fake-org/empty")
    with pytest.raises(DownloadError, match=r"datasets/manifest\.json not found.*remote root 'datasets'"):
        download(tmp_path / "a", "sp1024", 1, repo_id="fake-org/empty", progress=False)
    with pytest.raises(DownloadError, match=r"dataset repo nobody/nothing not found"):
        download(tmp_path / "b", "sp1024", 1, repo_id="nobody/nothing", progress=False)


def test_unreachable_endpoint_fails_fast_with_one_line(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(DownloadError, match=rf"cannot reach http://127\.0\.0\.1:{port}") as info:
        download(tmp_path / "data", "sp1024", 1, endpoint=f"http://127.0.0.1:{port}", progress=False)
    assert time.monotonic() - start < 10
    assert "\n" not in str(info.value)
    assert_no_leftovers(tmp_path / "data")


def test_progress_names_files_and_quiet_mode_is_silent(hub, tmp_path, capsys):
    download(tmp_path / "quiet", "sp1024", 1, progress=False)
    assert capsys.readouterr().err == ""
    download(tmp_path / "loud", "sp1024", 1, progress=True)
    err = capsys.readouterr().err
    assert "download sp1024" in err and "fineweb_train_000000.bin" in err and "5/5" in err
