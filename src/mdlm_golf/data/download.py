"""Fetch the parameter-golf challenge's published FineWeb export from the Hugging Face Hub.

Mirrors the challenge's own ``data/cached_challenge_fineweb.py`` (openai/parameter-golf):
the dataset repo ``willdepueoai/parameter-golf`` (repo_type "dataset") holds, under the
remote root ``datasets/``, a ``manifest.json`` plus ``datasets/fineweb10B_<variant>/
fineweb_{val,train}_NNNNNN.bin`` and ``tokenizers/...``. Locally the remote root is
stripped, giving the challenge's layout::

    OUT/manifest.json
    OUT/datasets/fineweb10B_sp1024/fineweb_{val,train}_NNNNNN.bin
    OUT/tokenizers/fineweb_1024_bpe.{model,vocab}

All val shards are fetched, and the first N train shards. Files already present and
complete are skipped; every file lands atomically (staged under OUT, then renamed).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Iterator

from .shards import DataError, read_shard_header

# huggingface_hub and tqdm are imported inside the functions that use them: they are slow to import, and
# nothing but a download needs them (training, evaluation and the record script import this package).

# Same env vars and defaults as the challenge's data/cached_challenge_fineweb.py.
REPO_ID_ENV = "MATCHED_FINEWEB_REPO_ID"
REMOTE_ROOT_ENV = "MATCHED_FINEWEB_REMOTE_ROOT_PREFIX"
DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
DEFAULT_REMOTE_ROOT = "datasets"
DEFAULT_VARIANT = "sp1024"
DEFAULT_TRAIN_SHARDS = 80  # the challenge script's default (shards of 100M tokens, ~200 MB each)
REPO_TYPE = "dataset"
PROBE_TIMEOUT_S = 10.0
# Exception class names (httpx/httpx2, requests, builtins) that mean "could not talk to the endpoint".
_NETWORK_ERRORS = {"TransportError", "NetworkError", "TimeoutException", "ConnectionError", "Timeout",
                   "TimeoutError", "ProxyError", "OfflineModeIsEnabled"}


class DownloadError(DataError):
    """The Hub export cannot be fetched as asked; the message is one line that names what."""


def _one_line(text: object) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else type(text).__name__


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def _is_shard(name: str) -> bool:
    return name.endswith(".bin")


class _Hub:
    """hf_hub_download against one repo/endpoint, staged into a folder under OUT."""

    def __init__(self, repo_id: str, remote_root: str, endpoint: str, staging: Path):
        self.repo_id, self.remote_root, self.endpoint, self.staging = repo_id, remote_root, endpoint, staging
        self.probed = False

    def where(self, remote: str) -> str:
        return f"{remote} in dataset repo {self.repo_id} at {self.endpoint}"

    def probe(self, remote: str) -> None:
        """One HEAD without retries, so an unreachable endpoint fails fast with a clear message."""
        if self.probed:
            return
        from huggingface_hub import get_hf_file_metadata, hf_hub_url  # on use (see the imports)

        url = hf_hub_url(self.repo_id, remote, repo_type=REPO_TYPE, endpoint=self.endpoint)
        try:
            meta = get_hf_file_metadata(url, timeout=PROBE_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - mapped to one-line errors below
            raise self.error(remote, e) from None
        if not meta.commit_hash:
            raise DownloadError(f"{self.endpoint}: does not answer like a Hugging Face Hub endpoint "
                                "(no X-Repo-Commit header); check HF_ENDPOINT")
        self.probed = True

    def error(self, remote: str, e: Exception) -> DownloadError:
        from huggingface_hub import utils as hf_utils  # on use (see the imports)

        if isinstance(e, DownloadError):
            return e
        if isinstance(e, hf_utils.RepositoryNotFoundError):
            return DownloadError(f"dataset repo {self.repo_id} not found (or not accessible) at "
                                 f"{self.endpoint} (set --repo-id or ${REPO_ID_ENV})")
        if isinstance(e, hf_utils.RevisionNotFoundError):
            return DownloadError(f"dataset repo {self.repo_id} at {self.endpoint}: revision not found")
        if isinstance(e, hf_utils.LocalEntryNotFoundError) or any(
                c.__name__ in _NETWORK_ERRORS for c in type(e).__mro__):
            return DownloadError(f"cannot reach {self.endpoint} to fetch {remote} from {self.repo_id} "
                                 f"({_one_line(e)}); check the network or HF_ENDPOINT")
        if isinstance(e, hf_utils.EntryNotFoundError):
            return DownloadError(f"{remote} not found in dataset repo {self.repo_id} at {self.endpoint} "
                                 f"(remote root {self.remote_root!r}; set --remote-root or ${REMOTE_ROOT_ENV})")
        if isinstance(e, hf_utils.HfHubHTTPError):
            status = getattr(getattr(e, "response", None), "status_code", "?")
            return DownloadError(f"HTTP {status} fetching {self.where(remote)}: {_one_line(e)}")
        return DownloadError(f"failed to fetch {self.where(remote)}: {type(e).__name__}: {_one_line(e)}")

    def fetch(self, remote: str, force: bool = False) -> Path:
        """Download one remote file into the staging folder; returns the staged path."""
        from huggingface_hub import hf_hub_download  # on use (see the imports)

        self.probe(remote)
        try:
            return Path(hf_hub_download(self.repo_id, remote, repo_type=REPO_TYPE, local_dir=self.staging,
                                        endpoint=self.endpoint, force_download=force))
        except Exception as e:  # noqa: BLE001 - every failure becomes one line naming the file
            raise self.error(remote, e) from None

    def place(self, relative: str, dest: Path, force: bool = False) -> None:
        """Fetch one file, check it, and only then rename it to its final name."""
        remote = _join(self.remote_root, relative)
        staged = self.fetch(remote, force=force)
        problem = _problem(staged)
        if problem is None:
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, dest)
            return
        staged.unlink(missing_ok=True)
        if not force:  # maybe a bad copy reused from the HF cache: fetch afresh once
            return self.place(relative, dest, force=True)
        raise DataError(f"{dest}: downloaded file is corrupt ({problem}); not kept (from {self.where(remote)})")


def _local_path(out: Path, relative: str) -> Path:
    """Where a path relative to the remote root lives locally (the challenge's mapping)."""
    rel = PurePosixPath(relative)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise DownloadError(f"manifest.json: refusing unsafe artifact path {relative!r}")
    return out.joinpath(*rel.parts)


def _file_ok(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def _problem(path: Path) -> str | None:
    """Why a file (downloaded, or present from before) is unusable, or None."""
    if _is_shard(path.name):
        try:
            read_shard_header(path)
        except DataError as e:
            return str(e).removeprefix(f"{path}: ")
        return None
    if not _file_ok(path):
        return "empty file"
    if path.name == "manifest.json":
        manifest = _load_manifest(path)
        if manifest is None or not isinstance(manifest.get("datasets"), list):
            return "not a JSON object with a \"datasets\" list"
    return None


def _load_manifest(path: Path) -> dict | None:
    if not _file_ok(path):
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _plan(manifest: dict, variant: str, train_shards: int, where: str) -> tuple[list[str], list[str]]:
    """(shard paths, tokenizer artifact paths) relative to the remote root, or a one-line error."""
    name = f"fineweb10B_{variant}"
    datasets = [d for d in manifest.get("datasets") or [] if isinstance(d, dict)]
    entry = next((d for d in datasets if d.get("name") == name), None)
    if entry is None:
        known = sorted(str(d.get("name", "")).removeprefix("fineweb10B_") for d in datasets)
        raise DownloadError(f"variant {variant!r} (dataset {name}) is not in {where}; "
                            f"available: {', '.join(known) or 'none'}")
    stats = entry.get("stats") or {}
    try:
        n_train, n_val = int(stats["files_train"]), int(stats["files_val"])
    except (KeyError, TypeError, ValueError):
        raise DownloadError(f"{where}: dataset {name} has no stats.files_train/files_val shard counts") from None
    if train_shards > n_train:
        raise DownloadError(f"variant {variant!r} has only {n_train} train shards in {where}; "
                            f"asked for {train_shards}")
    tok_name = entry.get("tokenizer_name")
    tok = next((t for t in manifest.get("tokenizers") or []
                if isinstance(t, dict) and t.get("name") == tok_name), None)
    if tok is None:
        raise DownloadError(f"{where}: tokenizer {tok_name!r} of dataset {name} is not listed")
    artifacts = [str(tok[k]) for k in ("model_path", "vocab_path", "path") if tok.get(k)]
    if not artifacts:
        raise DownloadError(f"{where}: tokenizer {tok_name!r} lists no files")
    shards = [f"datasets/{name}/fineweb_val_{i:06d}.bin" for i in range(n_val)]
    shards += [f"datasets/{name}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    return shards, artifacts


@contextmanager
def _hf_progress_bars(enabled: bool) -> Iterator[None]:
    """Silence huggingface_hub's own per-file byte bars when progress is off (restored after)."""
    from huggingface_hub.utils import (  # on use (see the imports)
        are_progress_bars_disabled, disable_progress_bars, enable_progress_bars)

    was_disabled = are_progress_bars_disabled()
    if not enabled and not was_disabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if not enabled and not was_disabled:
            enable_progress_bars()


def _settings(repo_id: str | None, remote_root: str | None, endpoint: str | None) -> tuple[str, str, str]:
    """(repo id, remote root, endpoint): the arguments, else the env vars (read now), else the defaults."""
    repo_id = repo_id or os.environ.get(REPO_ID_ENV) or DEFAULT_REPO_ID
    if remote_root is None:
        remote_root = os.environ.get(REMOTE_ROOT_ENV, DEFAULT_REMOTE_ROOT)
    if endpoint is None:
        from huggingface_hub import constants  # on use (see the imports)

        endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    return repo_id, remote_root.strip().strip("/"), endpoint.rstrip("/")


def _fetch_plan(hub: _Hub, manifest_path: Path, variant: str, train_shards: int) -> tuple[list[str], bool]:
    """(every file to have, relative to the remote root; whether the manifest was fetched).

    A local challenge manifest is used as is, unless it lacks what is asked: then it may be stale,
    and is fetched again once."""
    where = f"{hub.repo_id}/{_join(hub.remote_root, 'manifest.json')}"
    manifest = _load_manifest(manifest_path)
    if manifest is not None and not isinstance(manifest.get("datasets"), list):
        raise DownloadError(f"{manifest_path}: exists but is not a challenge export manifest "
                            "(no \"datasets\" list; e.g. written by prepare); use another --out")
    fetched = manifest is None
    if fetched:
        hub.place("manifest.json", manifest_path)
        manifest = _load_manifest(manifest_path) or {}
    try:
        shards, artifacts = _plan(manifest, variant, train_shards, where)
    except DownloadError:
        if fetched:
            raise
        hub.place("manifest.json", manifest_path)
        manifest = _load_manifest(manifest_path) or {}
        shards, artifacts = _plan(manifest, variant, train_shards, where)
        fetched = True
    return shards + artifacts, fetched


def _fetch_missing(hub: _Hub, todo: list[tuple[str, Path]], variant: str, progress: bool,
                   fetched: int) -> None:
    """Fetch each (remote-relative, local) file not already present and complete, with a file bar."""
    from tqdm.auto import tqdm  # on use (see the imports)

    with tqdm(total=len(todo) + 1, initial=1, unit="file", desc=f"download {variant}",
              disable=not progress, dynamic_ncols=True) as bar:
        for rel, dest in todo:
            bar.set_postfix_str(dest.name, refresh=True)
            if _problem(dest) is not None:
                if dest.exists() and progress:
                    bar.write(f"{dest}: incomplete or corrupt; downloading again")
                hub.place(rel, dest)
                fetched += 1
            bar.update(1)
        bar.set_postfix_str(f"{fetched} fetched, {len(todo) + 1 - fetched} already present", refresh=True)


def download(out: Path, variant: str = DEFAULT_VARIANT, train_shards: int = DEFAULT_TRAIN_SHARDS, *,
             repo_id: str | None = None, remote_root: str | None = None, endpoint: str | None = None,
             progress: bool = True) -> list[Path]:
    """Fetch the challenge export into OUT in the challenge's local layout; returns every local file.

    repo_id / remote_root default to $MATCHED_FINEWEB_REPO_ID / $MATCHED_FINEWEB_REMOTE_ROOT_PREFIX,
    then willdepueoai/parameter-golf and "datasets"; endpoint defaults to $HF_ENDPOINT (read at call
    time), then the Hub. Errors are DataError/DownloadError with a one-line message.
    """
    if train_shards < 0:
        raise DownloadError(f"train_shards must be >= 0, got {train_shards}")
    repo_id, remote_root, endpoint = _settings(repo_id, remote_root, endpoint)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=out))
    try:
        with _hf_progress_bars(progress):
            hub = _Hub(repo_id, remote_root, endpoint, staging)
            files, fetched = _fetch_plan(hub, manifest_path, variant, train_shards)
            todo = [(rel, _local_path(out, rel)) for rel in files]
            _fetch_missing(hub, todo, variant, progress, int(fetched))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [manifest_path] + [dest for _, dest in todo]
