"""The battery's file mutators: setups that build a case's inputs in its folder (copies of the shared
inputs, then bits flipped, files cut, headers, checkpoints, artifacts and manifests rewritten) and the
checks a case runs afterwards. The file formats are written out here from their modules' docs, so the
battery trusts none of the package's code to make its hostile inputs; the one exception is the .mdz header,
re-encoded by the package's own Header (its varints and CRC) so that a crafted field reaches the decoder."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mdlm_golf.coder.container import Header

if TYPE_CHECKING:  # runner imports this module; the context is only named in annotations here
    from .runner import Ctx

CKPT_SEAL = b"mdlm-golf-checkpoint-v2 sha256:"
ZIP_END = b"PK\x05\x06"
ART_HEADER = struct.Struct("<8sHI")
SHARD_HEADER_BYTES = 1024  # 256 int32 words: magic, version, token count, ...

Setup = Callable[["Ctx", Path], None]  # builds a case's inputs in its folder
Check = Callable[["Ctx", Path], list[str]]  # after an OK command: the problems found, if any


# ---------------------------------------------------------------- setups: small factories, composable

def chain(*steps: Setup) -> Setup:
    def run(ctx: Ctx, c: Path) -> None:
        for step in steps:
            step(ctx, c)
    return run


def files(entries: dict[str, bytes | None]) -> Setup:
    """Write these files into the case folder (None: a folder)."""
    def run(ctx: Ctx, c: Path) -> None:
        for rel, content in entries.items():
            path = c / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.mkdir() if content is None else path.write_bytes(content)
    return run


def copy(name: str, as_name: str | None = None) -> Setup:
    """A copy of a shared input (file or folder) in the case folder."""
    def run(ctx: Ctx, c: Path) -> None:
        src, dest = ctx.path(name), c / (as_name or name)
        shutil.copytree(src, dest) if src.is_dir() else shutil.copy(src, dest)
    return run


def copy_file(src: Path, rel: str) -> Setup:
    """A copy of a repository file (a fixture) in the case folder."""
    def run(ctx: Ctx, c: Path) -> None:
        shutil.copy(src, c / rel)
    return run


def copy_built(name: str, as_name: str) -> Setup:
    """A copy of an input only some cases need (Ctx.built builds it on first use) in the case folder."""
    def run(ctx: Ctx, c: Path) -> None:
        src = ctx.built(name)
        shutil.copytree(src, c / as_name) if src.is_dir() else shutil.copy(src, c / as_name)
    return run


def needs(name: str) -> Setup:
    """Build an input only some cases need before the case runs (its argv names it as {X}/NAME)."""
    def run(ctx: Ctx, c: Path) -> None:
        ctx.built(name)
    return run


def edit(rel: str, fn: Callable[[bytes], bytes]) -> Setup:
    """Rewrite a file of the case folder through fn."""
    def run(ctx: Ctx, c: Path) -> None:
        (c / rel).write_bytes(fn((c / rel).read_bytes()))
    return run


def flip(offset: int, bit: int = 0) -> Callable[[bytes], bytes]:
    """One flipped bit at offset (negative: from the end)."""
    def fn(data: bytes) -> bytes:
        out = bytearray(data)
        out[offset] ^= 1 << bit
        return bytes(out)
    return fn


def cut(keep: int) -> Callable[[bytes], bytes]:
    """The first `keep` bytes (negative: all but the last -keep)."""
    return lambda data: data[:keep]


def const(content: bytes) -> Callable[[bytes], bytes]:
    return lambda data: content


def unlink(rel: str) -> Setup:
    return lambda ctx, c: (c / rel).unlink()


def move(rel: str, to: str) -> Setup:
    """Rename a file of the case folder."""
    return lambda ctx, c: (c / rel).rename(c / to)


def to_dir(rel: str) -> Setup:
    """Replace a file of the case folder by a folder of the same name."""
    def run(ctx: Ctx, c: Path) -> None:
        (c / rel).unlink()
        (c / rel).mkdir()
        (c / rel / "inside.txt").write_text("a folder where a file belongs\n")
    return run


def symlink(rel: str, target: str) -> Setup:
    """A symbolic link at rel pointing to target (relative to the link's folder)."""
    return lambda ctx, c: (c / rel).symlink_to(target)


def chmod(rel: str, mode: int) -> Setup:
    return lambda ctx, c: os.chmod(c / rel, mode)


def listed_shards(data_dir: Path, split: str) -> list[str]:
    return json.loads((data_dir / "manifest.json").read_text())[split]["shards"]


def shards(split: str, fn: Callable[[bytes], bytes], every: bool = False) -> Setup:
    """Copy D into the case folder and damage its first (or every) listed shard of a split."""
    def run(ctx: Ctx, c: Path) -> None:
        copy("D")(ctx, c)
        names = listed_shards(c / "D", split)
        for name in names if every else names[:1]:
            edit(f"D/{name}", fn)(ctx, c)
    return run


def packed(offset: int, fmt: str, value: int) -> Callable[[bytes], bytes]:
    """`value` written as the struct format `fmt` at offset (a header field rewritten)."""
    def fn(data: bytes) -> bytes:
        out = bytearray(data)
        struct.pack_into(fmt, out, offset, value)
        return bytes(out)
    return fn


def header_word(word: int, value: int) -> Callable[[bytes], bytes]:
    """A shard header's int32 word rewritten."""
    return packed(4 * word, "<i", value)


def count_delta(delta: int) -> Callable[[bytes], bytes]:
    """The header's token count off by delta from what the file holds."""
    def fn(data: bytes) -> bytes:
        count = struct.unpack_from("<i", data, 8)[0]
        return header_word(2, count + delta)(data)
    return fn


def token_at(position: int, value: int) -> Callable[[bytes], bytes]:
    def fn(data: bytes) -> bytes:
        out = bytearray(data)
        struct.pack_into("<H", out, SHARD_HEADER_BYTES + 2 * position, value)
        return bytes(out)
    return fn


def no_tokens(data: bytes) -> bytes:
    return header_word(2, 0)(data[:SHARD_HEADER_BYTES])


def mdz_header(**changes) -> Callable[[bytes], bytes]:
    """An .mdz whose header says otherwise (num_tokens=2**44, ...), re-encoded with its CRC recomputed."""
    def fn(data: bytes) -> bytes:
        header, rest = Header.decode(data)
        return dataclasses.replace(header, **changes).encode() + rest
    return fn


def rewrite_json(folder: str, name: str, fn: Callable[[dict], str]) -> Setup:
    """Copy the base folder and rewrite its JSON file `name` as fn(parsed)."""
    def run(ctx: Ctx, c: Path) -> None:
        copy(folder)(ctx, c)
        path = c / folder / name
        path.write_text(fn(json.loads(path.read_text())))
    return run


def manifest(fn: Callable[[dict], str]) -> Setup:
    """Copy D and rewrite its manifest.json as fn(manifest)."""
    return rewrite_json("D", "manifest.json", fn)


# checkpoints: my own seal (sha256 in the zip comment), so crafted files pass the checksum and reach the loader

def seal(path: Path) -> None:
    data = bytearray(path.read_bytes())
    assert data[-22:-18] == ZIP_END and data[-2:] == b"\0\0", f"{path}: not a fresh torch zip"
    data[-2:] = struct.pack("<H", len(CKPT_SEAL) + 64)
    data += CKPT_SEAL + hashlib.sha256(data).hexdigest().encode()
    path.write_bytes(bytes(data))


def checkpoint(rel: str, fn: Callable[[dict, Path], object], sealed: bool = True, legacy: bool = False) -> Setup:
    """Copy R, then replace R/<rel> by torch.save(fn(its state)) (sealed, unsealed or an old-style pickle)."""
    def run(ctx: Ctx, c: Path) -> None:
        copy("R")(ctx, c)
        path = c / "R" / rel
        state = fn(torch.load(path, map_location="cpu", weights_only=True), c)
        if legacy:
            path.write_bytes(pickle.dumps(state, protocol=2))
            return
        torch.save(state, path)
        if sealed:
            seal(path)
    return run


class RunsCode:
    """Unpickling this calls os.system: the payload a hostile checkpoint carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"echo ran > '{self.marker}'",)


def poisoned(state: dict, c: Path) -> dict:
    return {**state, "extra": RunsCode(c / "PWNED")}


def poisoned_weight(state: dict, c: Path) -> dict:
    return {**state, "model": {**state["model"], "embed.weight": RunsCode(c / "PWNED")}}


def non_finite(value: float) -> Callable[[dict, Path], dict]:
    def fn(state: dict, c: Path) -> dict:
        model = dict(state["model"])
        name = next(k for k, t in model.items() if t.is_floating_point() and t.ndim == 2)
        model[name] = model[name].clone()
        model[name][0, 0] = value
        return {**state, "model": model}
    return fn


def state_with(**changes) -> Callable[[dict, Path], dict]:
    return lambda state, c: {**state, **changes}


def config_with(**changes) -> Callable[[dict, Path], dict]:
    return lambda state, c: {**state, "config": {**state["config"], **changes}}


def run_file(rel: str, fn: Callable[[bytes], bytes]) -> Setup:
    return chain(copy("R"), edit(f"R/{rel}", fn))


def config_json(fn: Callable[[dict], str]) -> Setup:
    """Copy R and rewrite its config.json as fn(config)."""
    return rewrite_json("R", "config.json", fn)


# artifacts: header | metadata JSON | payload | CRC-32; crafted ones are re-sealed so they pass the CRC

def artifact(fn_meta: Callable[[dict], bytes] | None = None, fn_raw: Callable[[bytes], bytes] | None = None,
             src: str = "AZ.bin") -> Setup:
    """Copy a zlib artifact as C/A.bin with its metadata and/or decompressed payload rewritten, CRC fixed."""
    def run(ctx: Ctx, c: Path) -> None:
        data = ctx.path(src).read_bytes()
        magic, version, meta_len = ART_HEADER.unpack_from(data)
        meta_bytes = data[ART_HEADER.size:ART_HEADER.size + meta_len]
        payload = data[ART_HEADER.size + meta_len:-4]
        meta = json.loads(meta_bytes)
        if fn_raw is not None:
            payload = zlib.compress(fn_raw(zlib.decompress(payload)))
            meta["payload_bytes"] = len(payload)
            meta_bytes = json.dumps(meta).encode()
        if fn_meta is not None:
            meta_bytes = fn_meta(meta)
        body = ART_HEADER.pack(magic, version, len(meta_bytes)) + meta_bytes + payload
        (c / "A.bin").write_bytes(body + struct.pack("<I", zlib.crc32(body)))
    return run


def meta_with(**changes) -> Callable[[dict], bytes]:
    return lambda meta: json.dumps({**meta, **changes}).encode()


def meta_config(**changes) -> Callable[[dict], bytes]:
    return lambda meta: json.dumps({**meta, "config": {**meta["config"], **changes}}).encode()


def meta_tensor(**changes) -> Callable[[dict], bytes]:
    """The tensor table's first entry says otherwise (its shape, its stored rows)."""
    def fn(meta: dict) -> bytes:
        first, *rest = meta["tensors"]
        return json.dumps({**meta, "tensors": [{**first, **changes}, *rest]}).encode()
    return fn


def stale_temp(rel: str, pid_of: str) -> Setup:
    """A temporary like an atomic writer leaves: `.NAME.tmpPID`, PID dead (a killed writer) or live (ours)."""
    def run(ctx: Ctx, c: Path) -> None:
        if pid_of == "dead":
            p = subprocess.Popen(["true"])
            p.wait()
            pid = p.pid
        else:
            pid = os.getpid()
        path = c / rel
        (path.parent / f".{path.name}.tmp{pid}").write_bytes(b"half a checkpoint " * 100)
    return run


# ---------------------------------------------------------------- checks after an OK command

def step_of(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["step"])


def no_temp_left(rel: str) -> Check:
    def check(ctx: Ctx, c: Path) -> list[str]:
        left = [p.name for p in (c / rel).iterdir() if ".tmp" in p.name and p.name.startswith(".")]
        return [f"stale temporaries left in {rel}: {left}"] if left else []
    return check


def live_temp_kept(rel: str) -> Check:
    def check(ctx: Ctx, c: Path) -> list[str]:
        kept = [p.name for p in (c / rel).iterdir() if p.name.endswith(f".tmp{os.getpid()}")]
        return [] if kept else [f"a live writer's temporary in {rel} was deleted"]
    return check


def model_at(rel: str, step: int) -> Check:
    def check(ctx: Ctx, c: Path) -> list[str]:
        path = c / rel
        if not path.is_file():
            return [f"{rel} missing"]
        got = step_of(path)
        return [] if got == step else [f"{rel} at step {got}, expected {step}"]
    return check


def exists(*rels: str) -> Check:
    def check(ctx: Ctx, c: Path) -> list[str]:
        return [f"{rel} missing" for rel in rels if not (c / rel).exists()]
    return check


def same_as(rel: str, name: str) -> Check:
    """The file the command wrote at `rel` holds exactly the shared input `name`'s bytes."""
    def check(ctx: Ctx, c: Path) -> list[str]:
        same = (c / rel).is_file() and (c / rel).read_bytes() == ctx.path(name).read_bytes()
        return [] if same else [f"{rel} does not hold {name}'s bytes"]
    return check


def no_temp_anywhere(ctx: Ctx, c: Path) -> list[str]:
    """No atomic writer's temporary (`.NAME.tmpPID`, file or folder) left anywhere in the case folder."""
    left = sorted(str(p.relative_to(c)) for p in c.rglob(".*.tmp*"))
    return [f"temporaries left: {left[:3]}"] if left else []


def json_field(rel: str, key: str, value: object) -> Check:
    """The JSON object the command wrote at `rel` holds `key` = `value`."""
    def check(ctx: Ctx, c: Path) -> list[str]:
        got = json.loads((c / rel).read_text(encoding="utf-8")).get(key)
        return [] if got == value else [f"{rel}: {key} is {got!r}, expected {value!r}"]
    return check


def absent(*rels: str) -> Check:
    """None of these paths exists (a record folder or manifest a stopped command must not leave)."""
    def check(ctx: Ctx, c: Path) -> list[str]:
        return [f"{rel} written" for rel in rels if (c / rel).exists()]
    return check


def checks(*parts: Check) -> Check:
    return lambda ctx, c: [p for part in parts for p in part(ctx, c)]

