"""Issue 12's battery: every command, tried as a careless or hostile user would, as real subprocesses.

    python bench/hostile.py [--work DIR] [--json PATH] [--only TEXT] [--list]

It builds real inputs first (a data folder prepared from tests/fixtures, a tiny trained run with a
checkpoint, a second run, exported artifacts, a compressed .mdz), then runs each case as its own
`mdlm-golf ...` subprocess (OMP_NUM_THREADS=1, no GPU, HF_ENDPOINT on a closed local port: nothing
leaves the machine) in its own folder, one at a time, and judges it:

  traceback            "Traceback" on stderr or stdout: always a failure.
  exit                 the exit code the expectation names (2 for a refusal, 0, 130 for Ctrl-C).
  one_line             a refusal prints exactly one non-empty line on stderr,
                       `mdlm-golf CMD: error: ...` (argparse's own errors: `mdlm-golf CMD: error:
                       argument ...`), and that line names the file or field at fault (the case's
                       `names`). Cases marked `preamble` (Ctrl-C, which first prints "stopping ...")
                       only need the LAST stderr line to be that line.
  data_lost            a file that existed in the case folder (or anywhere in the shared inputs)
                       before the case changed or vanished, outside the paths the case declares
                       `mutable` (a resumed run's own files). Checked for every case.
  corruption_accepted  a corrupted input (`corrupt`) gave exit 0. For a corrupted .mdz the
                       expectation is "refuse, or rebuild the original exactly": exit 0 counts as
                       accepted corruption only when the output differs from the original bytes.
  code_ran             a pickle checkpoint whose unpickling runs `echo > MARKER`: the case fails if
                       MARKER exists afterwards. Setup proves the payload is live by loading one with
                       weights_only=False in a throwaway process.

Expectations: "refuse" = exit 2 with the one-line rule above; "ok" = exit 0 (plus the case's own
checks: a file exists, a model is at a step, a temporary is gone); "refuse-or-exact" (corrupted .mdz);
"clean" = exit 0 or 2, either being legitimate (e.g. --num-seqs beyond the split), but never a
traceback; "exit-130" = `mdlm-golf CMD: interrupted` and exit 130. As the README says, a FIRST Ctrl-C
(or SIGTERM) to train is a clean stop: exit 0 with RUN/checkpoint.pt and no model.pt, which --resume
then carries to the end; a second Ctrl-C aborts with 130. "roundtrip" cases run compress then
decompress and need the exact input bytes back (held-out documents are taken from the end of
../shared/data/docs_selected.jsonl, past the fixture's first 1,187, when it exists).

Cases are data (a list of Case records built by small factories); corruption offsets come from a
seeded generator, so two runs try the same bytes. Permission cases are skipped (and counted) as root,
who ignores file modes. The table goes to stdout, progress to stderr; the exit status is 1 if any case
fails. --only TEXT runs the cases whose "category / name" contains TEXT; --work must be new or empty.
"""
from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import os
import pickle
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mdlm_golf.config import field_types  # only to strip config env vars (STEPS=...) from the environment

REPO = Path(__file__).resolve().parents[1]
FIXTURE_DOCS = REPO / "tests" / "fixtures" / "docs_1mb.jsonl"
TOKENIZER = REPO / "tests" / "fixtures" / "fineweb_1024_bpe.model"
HELD_OUT = REPO.parent / "shared" / "data" / "docs_selected.jsonl"
FIXTURE_COUNT = 1187  # the fixture holds the first 1,187 documents of docs_selected.jsonl
SEED = 20240520
TIMEOUT = 300  # seconds for any one subprocess
TINY = ("--preset", "tiny", "--log-every", "1")

REFUSE, OK, EXACT, CLEAN, INTERRUPTED = "refuse", "ok", "refuse-or-exact", "clean", "exit-130"
ERROR_LINE = re.compile(r"^mdlm-golf(?: [a-z]+)?: error: .+$")
INTERRUPT_LINE = re.compile(r"^mdlm-golf [a-z]+: interrupted$")
HEADER_BYTES_RE = re.compile(r"header (\d+) bytes")
# the file formats, as their modules document them (written out here so the battery trusts none of its code)
CKPT_SEAL = b"mdlm-golf-checkpoint-v2 sha256:"
ZIP_END = b"PK\x05\x06"
ART_HEADER = struct.Struct("<8sHI")
SHARD_HEADER_BYTES = 1024  # 256 int32 words: magic, version, token count, ...


# ---------------------------------------------------------------- inputs every case can use

@dataclass
class Ctx:
    """The shared inputs (read-only for every case) and how to run the CLI."""
    work: Path
    base: Path
    command: list[str]
    env: dict[str, str]
    root: bool
    mdz_header: int = 0
    texts: dict[str, bytes] = field(default_factory=dict)  # round-trip inputs by name
    http_port: int = 0

    def path(self, name: str) -> Path:
        return self.base / name

    def places(self, case_dir: Path) -> dict[str, str]:
        """What {X} stands for in a case's argv and names."""
        b = self.base
        return {"{D}": str(b / "D"), "{R}": str(b / "R"), "{R2}": str(b / "R2"), "{A}": str(b / "A.bin"),
                "{AZ}": str(b / "AZ.bin"), "{T}": str(TOKENIZER), "{T2}": str(b / "D2" / "tokenizer.model"),
                "{DOCS}": str(b / "docs.jsonl"), "{M}": str(b / "text.mdz"), "{TXT}": str(b / "text.txt"),
                "{C}": str(case_dir), "{HTTP}": f"http://127.0.0.1:{self.http_port}"}


Setup = Callable[[Ctx, Path], None]
Check = Callable[[Ctx, Path], list[str]]


@dataclass(frozen=True)
class Case:
    """One hostile try: a command line, what it must do, and how its inputs are made."""
    category: str
    name: str
    argv: tuple[str, ...]
    expect: str = REFUSE
    names: str = ""  # text the error line must contain ({C}, {D}, ... allowed)
    setup: Setup | None = None
    corrupt: bool = False  # a damaged input: exit 0 is corruption accepted
    marker: bool = False  # a code-running pickle: {C}/PWNED must not appear
    pristine: bool = False  # a refusal must create nothing in the case folder
    preamble: bool = False  # lines before the final error/interrupted line are allowed
    mutable: tuple[str, ...] = ()  # case-folder paths (prefixes) the command may change
    env: tuple[tuple[str, str], ...] = ()
    nonroot: bool = False  # needs file permissions to mean something
    output: str = ""  # for EXACT: the file the command writes, compared with the original text
    check: Check | None = None  # further checks after an OK command
    runner: str = "cli"  # cli | roundtrip | signal
    data: bytes = b""  # round-trip input
    signal_plan: tuple = ()  # (kind, ...) for runner == "signal"


@dataclass
class Outcome:
    """What a case did and whether that is what it had to do."""
    category: str
    name: str
    expect: str
    argv: str
    exit: int | None = None
    seconds: float = 0.0
    traceback: bool = False
    one_line: bool = False
    named: bool = True
    data_lost: list[str] = field(default_factory=list)
    corruption_accepted: bool = False
    code_ran: bool = False
    skipped: str = ""
    problems: list[str] = field(default_factory=list)
    stderr_tail: str = ""

    @property
    def passed(self) -> bool:
        return not self.skipped and not self.problems


# ---------------------------------------------------------------- running the CLI

def cli_command() -> list[str]:
    """The installed `mdlm-golf` entry point (what a user types), else `python -m mdlm_golf`."""
    exe = shutil.which("mdlm-golf")
    return [exe] if exe else [sys.executable, "-m", "mdlm_golf"]


def closed_port() -> int:
    """A local port nothing listens on: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(work: Path) -> dict[str, str]:
    """The user's environment without config overrides (STEPS=..., LR=...), one thread, no GPU, no network."""
    env = {k: v for k, v in os.environ.items() if k not in {f.upper() for f in field_types()}
           and not k.startswith(("HF_", "MATCHED_FINEWEB", "HUGGING"))}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HOME=str(work / "hf"),
               HF_HUB_DISABLE_TELEMETRY="1", HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}",
               PYTHONDONTWRITEBYTECODE="1")
    return env


@dataclass
class Result:
    code: int | None
    stdout: str
    stderr: str
    seconds: float


def run_cli(ctx: Ctx, argv: list[str], cwd: Path, env: dict[str, str] | None = None,
            timeout: float = TIMEOUT) -> Result:
    """One mdlm-golf subprocess, output captured; a hang is killed and reported as exit None."""
    began = time.monotonic()
    try:
        p = subprocess.run(ctx.command + argv, cwd=cwd, env=env or ctx.env, capture_output=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
        code, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        code, out, err = None, e.stdout or b"", (e.stderr or b"") + b"\n[hostile: killed after timeout]"
    dec = lambda b: b.decode("utf-8", "replace")  # noqa: E731
    return Result(code, dec(out), dec(err), time.monotonic() - began)


def fill(text: str, places: dict[str, str]) -> str:
    for key, value in places.items():
        text = text.replace(key, value)
    return text


# ---------------------------------------------------------------- building the shared inputs

def must(res: Result, what: str) -> Result:
    """Setup steps must succeed: the battery is meaningless on broken inputs."""
    if res.code != 0:
        raise SystemExit(f"hostile: setup failed at {what} (exit {res.code})\n{res.stdout[-2000:]}\n"
                         f"{res.stderr[-3000:]}")
    return res


def held_out_docs(count: int = 10) -> list[str]:
    """Documents from the end of the shared corpus, never in the fixture (which holds its first 1,187)."""
    if not HELD_OUT.is_file():
        return []
    lines = HELD_OUT.read_text(encoding="utf-8").splitlines()
    picked = []
    for line in reversed(lines[FIXTURE_COUNT:]):
        text = json.loads(line)["text"]
        if 300 <= len(text.encode()) <= 4000:
            picked.append(text)
        if len(picked) == count:
            break
    return picked


def build_base(ctx: Ctx) -> None:
    """Data (300 fixture docs, 20 val), a 4-step tiny run with a checkpoint, a second run (another seed),
    two artifacts (brotli/best, zlib), a tokenizer trained by prepare, and a compressed text."""
    b, log = ctx.base, lambda m: print(f"hostile: setup: {m}", file=sys.stderr, flush=True)
    b.mkdir(parents=True)
    with open(FIXTURE_DOCS, encoding="utf-8") as f:
        (b / "docs.jsonl").write_text("".join(f.readline() for _ in range(300)), encoding="utf-8")
    steps = [("prepare", ["prepare", "--docs", str(b / "docs.jsonl"), "--tokenizer", str(TOKENIZER),
                          "--out", str(b / "D"), "--val-docs", "20", "--shard-tokens", "20000"]),
             ("prepare (own tokenizer)", ["prepare", "--docs", str(b / "docs.jsonl"), "--out", str(b / "D2"),
                                          "--val-docs", "20", "--vocab-size", "300"]),
             ("train", ["train", "--data", str(b / "D"), "--out", str(b / "R"), *TINY, "--steps", "4",
                        "--checkpoint-every", "2", "--eval-num-seqs", "2", "--elbo-steps", "2"]),
             ("train (second run)", ["train", "--data", str(b / "D"), "--out", str(b / "R2"), *TINY,
                                     "--steps", "2", "--seed", "7", "--no-eval"]),
             ("export", ["export", "--run", str(b / "R"), "--out", str(b / "A.bin")]),
             ("export (zlib)", ["export", "--run", str(b / "R"), "--out", str(b / "AZ.bin"),
                                "--compressor", "zlib"])]
    for what, argv in steps:
        log(what)
        must(run_cli(ctx, argv, b), what)
    tokenizers = list((b / "D2").glob("*.model"))
    if tokenizers and tokenizers[0].name != "tokenizer.model":
        shutil.copy(tokenizers[0], b / "D2" / "tokenizer.model")
    held = held_out_docs()
    text = held[0] if held else FIXTURE_DOCS.read_text(encoding="utf-8").splitlines()[-1]
    (b / "text.txt").write_bytes(text.encode() if held else json.loads(text)["text"].encode())
    log("compress")
    res = must(run_cli(ctx, ["compress", "--run", str(b / "R"), str(b / "text.txt"), str(b / "text.mdz")], b),
               "compress")
    ctx.mdz_header = int(HEADER_BYTES_RE.search(res.stderr)[1])
    ctx.texts = round_trip_inputs(held)
    log("checking that the code-running pickle is live (loaded with weights_only=False elsewhere)")
    prove_payload_live(ctx)


def round_trip_inputs(held: list[str]) -> dict[str, bytes]:
    """Held-out docs, text outside the vocabulary, odd whitespace, invalid UTF-8, binary, tiny files,
    text the tokenizer's NFKC would change, SentencePiece's own markers, and the repo's source files."""
    rng = np.random.default_rng(SEED)
    texts = {f"held-out-{i}": t.encode() for i, t in enumerate(held)}
    texts.update({
        "accents": "café naïve résumé Ångström façade œuvre Zürich ß".encode(),
        "underscores": b"snake_case_name __init__ __dunder__ _private a_b_c ____",
        "emoji": "ok 🙂🚀👍🏽 family 👨‍👩‍👧 flag 🇫🇷 end".encode(),
        "cjk": "中文字符 日本語のテキスト 한국어 텍스트 混合 mixed".encode(),
        "nfkc-changes": "ﬁ ligature, ＦＵＬＬＷＩＤＴＨ, ½ ™ ℌ ①, A\u030a vs Å, \u00a0nbsp".encode(),
        "zero-width-bidi": "a\u200bb\u200dc \u202eevil\u202c \ufeffbom \u2028line".encode(),
        "sentencepiece-markers": "▁ ▁▁word <unk> <s> </s> <pad> \u2581x".encode(),
        "whitespace": b"tabs\there\t\t\tand\r\nCRLF\rCR only\n\n\n  leading   repeated    spaces   \n\t \n",
        "only-newlines": b"\n\n\n\n",
        "only-spaces": b"        ",
        "nul-and-controls": b"a\x00b\x01\x02\x1b[31mred\x1b[0m\x7f end",
        "invalid-utf8": b"ok \xff\xfe \xc3\x28 \xa0\xa1 \xed\xa0\x80 \xf0\x28\x8c\xbc \xc0\xaf end",
        "truncated-utf8-tail": "ends mid character é".encode()[:-1],
        "latin1": "caf\xe9 na\xefve".encode("latin-1"),
        "utf16": "utf-16 text".encode("utf-16"),
        "random-binary": rng.integers(0, 256, 2000, dtype=np.uint8).tobytes(),
        "empty": b"",
        "one-byte": b"a",
        "one-byte-ff": b"\xff",
        "one-newline": b"\n",
        "long-run": b"a" * 3000,
        "repo-files.py": (REPO / "src" / "mdlm_golf" / "files.py").read_bytes(),
        "repo-pyproject.toml": (REPO / "pyproject.toml").read_bytes(),
        "repo-tokenizer.model": TOKENIZER.read_bytes()[:3000],
    })
    return texts


class RunsCode:
    """Unpickling this calls os.system: the payload a hostile checkpoint carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"echo ran > '{self.marker}'",)


def prove_payload_live(ctx: Ctx) -> None:
    """The code_ran cases mean something only if the payload does run when a careless loader unpickles it."""
    probe_dir = ctx.work / "probe"
    probe_dir.mkdir()
    evil, marker = probe_dir / "evil.pt", probe_dir / "RAN"
    torch.save({"x": RunsCode(marker)}, evil)
    code = f"import torch; torch.load({str(evil)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], env=ctx.env, capture_output=True, timeout=TIMEOUT)
    if not marker.exists():
        raise SystemExit("hostile: the code-running pickle did not run even with weights_only=False")
    shutil.rmtree(probe_dir)


# ---------------------------------------------------------------- a local HTTP server that is not a Hub

class NotAHub(http.server.BaseHTTPRequestHandler):
    """/garbage/...: 200 with junk and no Hub headers; anything else: 404."""

    def answer(self, body: bool) -> None:
        junk = self.path.startswith("/garbage")
        self.send_response(200 if junk else 404)
        payload = b"this is not a hugging face hub\n"
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def do_HEAD(self) -> None:  # noqa: N802
        self.answer(False)

    def do_GET(self) -> None:  # noqa: N802
        self.answer(True)

    def log_message(self, *args) -> None:
        pass


def start_http() -> int:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotAHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1]


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


def to_dir(rel: str) -> Setup:
    """Replace a file of the case folder by a folder of the same name."""
    def run(ctx: Ctx, c: Path) -> None:
        (c / rel).unlink()
        (c / rel).mkdir()
        (c / rel / "inside.txt").write_text("a folder where a file belongs\n")
    return run


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


def header_word(word: int, value: int) -> Callable[[bytes], bytes]:
    def fn(data: bytes) -> bytes:
        out = bytearray(data)
        struct.pack_into("<i", out, 4 * word, value)
        return bytes(out)
    return fn


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


def checks(*parts: Check) -> Check:
    return lambda ctx, c: [p for part in parts for p in part(ctx, c)]


# ---------------------------------------------------------------- the cases

def flag_cases() -> list[Case]:
    """Every numeric flag out of range, nan/inf, non-numbers, unknown enum values: exit 2, naming the flag,
    before anything is written."""
    train = ("train", "--data", "{D}", "--out", "{C}/R", *TINY, "--steps", "2", "--no-eval")
    bad_train = [("steps", "0"), ("steps", "-5"), ("steps", "1.5"), ("steps", "abc"), ("steps", ""),
                 ("elbo-steps", "0"), ("max-wallclock", "-1"), ("max-wallclock", "nan"),
                 ("warmup-steps", "-1"), ("warmdown-steps", "-1"), ("checkpoint-every", "-1"),
                 ("vocab-size", "0"), ("vocab-size", "70000"), ("lr", "-1"), ("lr", "0"), ("lr", "nan"),
                 ("lr", "inf"), ("lr", "-inf"), ("lr", "1e999"), ("lr", "abc"), ("batch-rows", "0"),
                 ("grad-accum", "0"), ("seq-len", "0"), ("num-layers", "0"), ("model-dim", "0"),
                 ("num-heads", "0"), ("model-dim", "65"), ("mlp-mult", "0"), ("cond-dim", "0"), ("ema", "1"),
                 ("ema", "-0.5"), ("noise-eps", "0"), ("noise-eps", "1"), ("anchor-mask-prob", "2"),
                 ("weight-decay", "-1"), ("grad-clip", "0"), ("seed", "-1"), ("seed", "4294967296"),
                 ("log-every", "0"), ("eval-num-seqs", "-1"), ("eval-batch-rows", "0"), ("val-every", "-1"),
                 ("block-size", "7"), ("block-size", "-1"), ("shards-per-group", "0"), ("muon-lr", "0"),
                 ("time-cond", "maybe"), ("compile", "sometimes"), ("objective", "foo"),
                 ("optimizer", "foo"), ("layout", "foo")]
    unnamed = {("model-dim", "65")}  # width not divisible by the heads: either field may be named
    cases = [Case("flags", f"train --{flag} {value or 'EMPTY'}", (*train, f"--{flag}", value),
                  names="" if (flag, value) in unnamed else flag.replace("-", "_"), pristine=True)
             for flag, value in bad_train]
    cases += [Case("flags", "train --preset foo", (*train, "--preset", "foo"), names="--preset", pristine=True),
              Case("flags", "train env STEPS=-1", train[:-3] + ("--no-eval",), names="steps", pristine=True,
                   env=(("STEPS", "-1"),)),
              Case("flags", "train env LR=nan", train, names="lr", pristine=True, env=(("LR", "nan"),)),
              Case("flags", "train env SEQ_LEN=abc", train, names="seq_len", pristine=True,
                   env=(("SEQ_LEN", "abc"),)),
              Case("flags", "train without --out or --resume", ("train", "--data", "{D}"), names="--out",
                   pristine=True)]
    evals = ("eval", "--run", "{R}", "--data", "{D}", "--num-seqs", "2", "--elbo-steps", "2")
    bad_eval = [("--batch-rows", "0"), ("--draws", "0"), ("--draws", "-1"), ("--elbo-steps", "0"),
                ("--elbo-steps", "abc"), ("--num-seqs", "-1"), ("--seed", "-1"), ("--grid", "foo"),
                ("--mode", "foo"), ("--method", "foo"), ("--order", "foo")]
    cases += [Case("flags", f"eval {flag} {value}", (*evals, flag, value), names=flag, pristine=True)
              for flag, value in bad_eval]
    planned = (*evals, "--method", "planned")
    cases += [Case("flags", "eval --passes 0", (*planned, "--passes", "0"), names="--passes", pristine=True),
              Case("flags", "eval --tokens-per-pass 0", (*planned, "--tokens-per-pass", "0"),
                   names="--tokens-per-pass", pristine=True),
              Case("flags", "eval --passes with --tokens-per-pass", (*planned, "--passes", "2",
                                                                      "--tokens-per-pass", "2"),
                   names="--tokens-per-pass", pristine=True),
              Case("flags", "eval --run with --artifact", (*evals, "--artifact", "{A}"), names="--artifact",
                   pristine=True),
              Case("flags", "eval --num-seqs beyond the split", (*evals[:-4], "--num-seqs", "100000",
                                                                 "--elbo-steps", "1"), expect=CLEAN)]
    sample = ("sample", "--run", "{R}", "--length", "16", "--steps", "4")
    bad_sample = [("--length", "1"), ("--length", "0"), ("--length", "100000"), ("--steps", "0"), ("--num", "0"),
                  ("--temperature", "0"), ("--temperature", "-1"), ("--temperature", "nan"), ("--top-p", "0"),
                  ("--top-p", "1.5"), ("--top-p", "nan"), ("--seed", "-1"), ("--sampler", "foo")]
    cases += [Case("flags", f"sample {flag} {value}", (*sample, flag, value),
                   names="length" if value == "100000" else flag, pristine=True) for flag, value in bad_sample]
    export = ("export", "--run", "{R}", "--out", "{C}/A.bin")
    bad_export = [("--quant", "foo", "foo"), ("--quant", "int3", "int3"), ("--quant", "embed=int9", "int9"),
                  ("--quant", "bogus=int8", "bogus"), ("--compressor", "foo", "--compressor"),
                  ("--small-numel", "-1", "--small-numel"), ("--method", "foo", "--method"),
                  ("--layout", "foo", "--layout")]
    cases += [Case("flags", f"export {flag} {value}", (*export, flag, value), names=named, pristine=True)
              for flag, value, named in bad_export]
    cases += [Case("flags", "export --method gptq without --data", (*export, "--method", "gptq"),
                   names="calibration data", pristine=True)]
    compress = ("compress", "--run", "{R}", "{TXT}", "{C}/x.mdz")
    cases += [Case("flags", f"compress {flag} {value}", (*compress, flag, value), names=flag, pristine=True)
              for flag, value in [("--passes", "0"), ("--passes", "-3"), ("--tokens-per-pass", "0"),
                                  ("--mode", "foo"), ("--order", "foo")]]
    prepare = ("prepare", "--docs", "{DOCS}", "--tokenizer", "{T}", "--out", "{C}/D", "--val-docs", "20")
    cases += [Case("flags", f"prepare {flag} {value}", (*prepare, flag, value), names=flag, pristine=True)
              for flag, value in [("--val-docs", "0"), ("--val-docs", "-1"), ("--shard-tokens", "0"),
                                  ("--vocab-size", "0"), ("--vocab-size", "3"), ("--val-docs", "abc")]]
    cases += [Case("flags", "prepare --val-docs beyond the docs", (*prepare, "--val-docs", "100000"),
                   names="{DOCS}", pristine=True),
              Case("flags", "download --train-shards -1", ("download", "--train-shards", "-1", "--out", "{C}/dl"),
                   names="--train-shards", pristine=True),
              Case("flags", "download --train-shards abc", ("download", "--train-shards", "abc",
                                                            "--out", "{C}/dl"), names="--train-shards",
                   pristine=True)]
    sub = ("submission", "--run", "{R}", "--artifact", "{A}", "--data", "{D}", "--out", "{C}/S", "--name", "x",
           "--github-id", "y")
    cases += [Case("flags", f"submission {flag} {value}", (*sub, flag, value), names=flag, pristine=True)
              for flag, value in [("--num-seqs", "-1"), ("--elbo-steps", "0"), ("--seed", "-1")]]
    ablate = ("ablate", "--data", "{D}", "--out", "{C}/O", *TINY, "--steps", "1")
    cases += [Case("flags", "ablate --param foo", (*ablate, "--param", "foo", "--values", "1,2"), names="foo",
                   pristine=True),
              Case("flags", "ablate --values a,b", (*ablate, "--param", "num_heads", "--values", "a,b"),
                   names="num_heads", pristine=True),
              Case("flags", "ablate --values empty", (*ablate, "--param", "num_heads", "--values", ""),
                   names="num_heads", pristine=True),
              Case("flags", "ablate --values 0", (*ablate, "--param", "num_heads", "--values", "0"),
                   names="num_heads", pristine=True),
              Case("flags", "ablate --seeds 1,-2", (*ablate, "--param", "lr", "--values", "1e-3",
                                                    "--seeds", "1,-2"), names="seed", pristine=True),
              Case("flags", "race --recipes foo", ("race", "--data", "{D}", "--out", "{C}/O", *TINY,
                                                   "--recipes", "foo"), names="foo", pristine=True),
              Case("flags", "race --recipe bad syntax", ("race", "--data", "{D}", "--out", "{C}/O", *TINY,
                                                         "--recipe", "nocolon"), names="nocolon", pristine=True),
              Case("flags", "race --recipe unknown field", ("race", "--data", "{D}", "--out", "{C}/O", *TINY,
                                                            "--recipe", "x:bogus_field=3"), names="bogus_field",
                   pristine=True),
              Case("flags", "race --seeds x", ("race", "--data", "{D}", "--out", "{C}/O", *TINY, "--seeds", "x"),
                   names="'x'", pristine=True),
              Case("flags", "unknown command", ("frobnicate",), names="frobnicate", pristine=True),
              Case("flags", "no command", (), names="command", pristine=True)]
    return cases


def missing_cases() -> list[Case]:
    """Files and folders that are not there: exit 2 naming them."""
    gone = "{C}/missing"
    return [
        Case("missing", "prepare --docs", ("prepare", "--docs", f"{gone}.jsonl", "--tokenizer", "{T}", "--out",
                                           "{C}/D", "--val-docs", "20"), names=f"{gone}.jsonl"),
        Case("missing", "prepare --tokenizer", ("prepare", "--docs", "{DOCS}", "--tokenizer", f"{gone}.model",
                                                "--out", "{C}/D", "--val-docs", "20"), names=f"{gone}.model"),
        Case("missing", "train --data", ("train", "--data", gone, "--out", "{C}/R", *TINY), names=gone),
        Case("missing", "train --tokenizer", ("train", "--data", "{D}", "--tokenizer", f"{gone}.model",
                                              "--out", "{C}/R", *TINY, "--steps", "1"), names=f"{gone}.model"),
        Case("missing", "train --resume", ("train", "--resume", gone, "--data", "{D}"), names=gone),
        Case("missing", "train --resume without checkpoint.pt", ("train", "--resume", "{C}/R", "--data", "{D}"),
             names="{C}/R/checkpoint.pt", setup=chain(copy("R"), unlink("R/checkpoint.pt"))),
        Case("missing", "eval --run", ("eval", "--run", gone, "--data", "{D}"), names=gone),
        Case("missing", "eval --run: empty folder", ("eval", "--run", "{C}/E", "--data", "{D}"),
             names="{C}/E/model.pt", setup=files({"E": None})),
        Case("missing", "eval --artifact", ("eval", "--artifact", f"{gone}.bin", "--data", "{D}"),
             names=f"{gone}.bin"),
        Case("missing", "eval --data", ("eval", "--run", "{R}", "--data", gone), names=gone),
        Case("missing", "sample --run", ("sample", "--run", gone), names=gone),
        Case("missing", "sample --artifact", ("sample", "--artifact", f"{gone}.bin"), names=f"{gone}.bin"),
        Case("missing", "sample --tokenizer", ("sample", "--run", "{R}", "--tokenizer", f"{gone}.model",
                                               "--length", "8", "--steps", "2"), names=f"{gone}.model"),
        Case("missing", "export --run", ("export", "--run", gone, "--out", "{C}/A.bin"), names=gone),
        Case("missing", "export --data for gptq", ("export", "--run", "{R}", "--out", "{C}/A.bin", "--method",
                                                   "gptq", "--data", gone), names=gone),
        Case("missing", "compress input", ("compress", "--run", "{R}", f"{gone}.txt", "{C}/x.mdz"),
             names=f"{gone}.txt"),
        Case("missing", "compress --run", ("compress", "--run", gone, "{TXT}", "{C}/x.mdz"), names=gone),
        Case("missing", "decompress input", ("decompress", "--run", "{R}", f"{gone}.mdz", "{C}/x.txt"),
             names=f"{gone}.mdz"),
        Case("missing", "decompress --run", ("decompress", "--run", gone, "{M}", "{C}/x.txt"), names=gone),
        Case("missing", "submission --artifact", ("submission", "--run", "{R}", "--artifact", f"{gone}.bin",
                                                  "--data", "{D}", "--out", "{C}/S", "--name", "x",
                                                  "--github-id", "y"), names=f"{gone}.bin"),
        Case("missing", "submission --run", ("submission", "--run", gone, "--artifact", "{A}", "--data", "{D}",
                                             "--out", "{C}/S", "--name", "x", "--github-id", "y",
                                             "--num-seqs", "2", "--elbo-steps", "2"), names=gone),
        Case("missing", "ablate --data", ("ablate", "--param", "lr", "--values", "1e-3", "--data", gone,
                                          "--out", "{C}/O", *TINY, "--steps", "1"), names=gone),
    ]


def directory_cases() -> list[Case]:
    """A folder where a file belongs: exit 2 naming it; a folder in the way of an output is left alone."""
    folder = files({"F": None, "F/keep.txt": b"precious\n"})
    return [
        Case("directory", "prepare --docs is a folder", ("prepare", "--docs", "{C}/F", "--tokenizer", "{T}",
                                                         "--out", "{C}/D", "--val-docs", "20"), names="{C}/F",
             setup=folder),
        Case("directory", "prepare --tokenizer is a folder", ("prepare", "--docs", "{DOCS}", "--tokenizer",
                                                              "{C}/F", "--out", "{C}/D", "--val-docs", "20"),
             names="{C}/F", setup=folder),
        Case("directory", "train --tokenizer is a folder", ("train", "--data", "{D}", "--tokenizer", "{C}/F",
                                                            "--out", "{C}/R", *TINY, "--steps", "1"),
             names="{C}/F", setup=folder),
        Case("directory", "eval --artifact is a folder", ("eval", "--artifact", "{C}/F", "--data", "{D}"),
             names="{C}/F", setup=folder),
        Case("directory", "sample --artifact is a folder", ("sample", "--artifact", "{C}/F"), names="{C}/F",
             setup=folder),
        Case("directory", "eval: RUN/model.pt is a folder", ("eval", "--run", "{C}/R", "--data", "{D}"),
             names="{C}/R/model.pt", setup=chain(copy("R"), to_dir("R/model.pt"))),
        Case("directory", "resume: RUN/checkpoint.pt is a folder", ("train", "--resume", "{C}/R", "--data", "{D}"),
             names="{C}/R/checkpoint.pt", setup=chain(copy("R"), to_dir("R/checkpoint.pt"))),
        Case("directory", "compress input is a folder", ("compress", "--run", "{R}", "{C}/F", "{C}/x.mdz"),
             names="{C}/F", setup=folder),
        Case("directory", "compress output is a folder", ("compress", "--run", "{R}", "{TXT}", "{C}/F"),
             names="{C}/F", setup=folder),
        Case("directory", "decompress input is a folder", ("decompress", "--run", "{R}", "{C}/F", "{C}/x.txt"),
             names="{C}/F", setup=folder),
        Case("directory", "decompress output is a folder", ("decompress", "--run", "{R}", "{M}", "{C}/F"),
             names="{C}/F", setup=folder),
        Case("directory", "export --out is a folder", ("export", "--run", "{R}", "--out", "{C}/F"),
             names="{C}/F", setup=folder),
        Case("directory", "eval --json is a folder", ("eval", "--run", "{R}", "--data", "{D}", "--num-seqs", "2",
                                                      "--elbo-steps", "2", "--json", "{C}/F"), names="{C}/F",
             setup=folder),
        Case("directory", "val shard is a folder", ("eval", "--run", "{R}", "--data", "{C}/D", "--num-seqs", "2",
                                                    "--elbo-steps", "2"), names="{C}/D/fineweb_val_000000.bin",
             setup=chain(copy("D"), to_dir("D/fineweb_val_000000.bin"))),
        Case("directory", "train shard is a folder", ("train", "--data", "{C}/D", "--out", "{C}/R", *TINY,
                                                      "--steps", "2", "--no-eval"),
             names="{C}/D/fineweb_train_000000.bin",
             setup=chain(copy("D"), to_dir("D/fineweb_train_000000.bin"))),
        Case("directory", "manifest.json is a folder", ("train", "--data", "{C}/D", "--out", "{C}/R", *TINY,
                                                        "--steps", "1", "--no-eval"),
             names="{C}/D/manifest.json", setup=chain(copy("D"), to_dir("D/manifest.json"))),
    ]


def under_file_cases() -> list[Case]:
    """An output path below a regular file: exit 2 naming the path; the file stays as it was."""
    blocker = files({"F": b"a regular file, not a folder\n"})
    out = "{C}/F/sub"
    return [
        Case("under-file", "prepare --out", ("prepare", "--docs", "{DOCS}", "--tokenizer", "{T}", "--out", out,
                                             "--val-docs", "20"), names=out, setup=blocker),
        Case("under-file", "train --out", ("train", "--data", "{D}", "--out", out, *TINY, "--steps", "1"),
             names=out, setup=blocker),
        Case("under-file", "export --out", ("export", "--run", "{R}", "--out", f"{out}/A.bin"),
             names=f"{out}/A.bin", setup=blocker),
        Case("under-file", "export --json", ("export", "--run", "{R}", "--out", "{C}/A.bin", "--json",
                                             f"{out}/r.json"), names=f"{out}/r.json", setup=blocker,
             mutable=("A.bin",)),
        Case("under-file", "compress output", ("compress", "--run", "{R}", "{TXT}", f"{out}/x.mdz"),
             names=f"{out}/x.mdz", setup=blocker),
        Case("under-file", "decompress output", ("decompress", "--run", "{R}", "{M}", f"{out}/x.txt"),
             names=f"{out}/x.txt", setup=blocker),
        Case("under-file", "eval --json", ("eval", "--run", "{R}", "--data", "{D}", "--num-seqs", "2",
                                           "--elbo-steps", "2", "--json", f"{out}/e.json"),
             names=f"{out}/e.json", setup=blocker),
        Case("under-file", "submission --out", ("submission", "--run", "{R}", "--artifact", "{A}", "--data",
                                                "{D}", "--out", out, "--name", "x", "--github-id", "y",
                                                "--num-seqs", "2", "--elbo-steps", "2"), names=out,
             setup=blocker),
        Case("under-file", "download --out", ("download", "--out", out, "--train-shards", "1", "--quiet"),
             names=out, setup=blocker),
        Case("under-file", "ablate --out", ("ablate", "--param", "lr", "--values", "1e-3", "--data", "{D}",
                                            "--out", out, *TINY, "--steps", "1"), names=out, setup=blocker),
        Case("under-file", "race --out", ("race", "--recipes", "today", "--seeds", "1", "--data", "{D}",
                                          "--out", out, *TINY, "--steps", "1"), names=out, setup=blocker),
    ]


def permission_cases() -> list[Case]:
    """No permission to write a folder or read a file (skipped as root, who has every permission)."""
    locked = files({"L": None})
    lock = chmod("L", 0o500)
    return [
        Case("permission", "prepare --out in a read-only folder", ("prepare", "--docs", "{DOCS}", "--tokenizer",
                                                                   "{T}", "--out", "{C}/L/D", "--val-docs", "20"),
             names="{C}/L/D", setup=chain(locked, lock), nonroot=True),
        Case("permission", "train --out in a read-only folder", ("train", "--data", "{D}", "--out", "{C}/L/R",
                                                                 *TINY, "--steps", "1"),
             names="{C}/L/R", setup=chain(locked, lock), nonroot=True),
        Case("permission", "export --out in a read-only folder", ("export", "--run", "{R}", "--out",
                                                                  "{C}/L/A.bin"),
             names="{C}/L/A.bin", setup=chain(locked, lock), nonroot=True),
        Case("permission", "compress output in a read-only folder", ("compress", "--run", "{R}", "{TXT}",
                                                                     "{C}/L/x.mdz"),
             names="{C}/L/x.mdz", setup=chain(locked, lock), nonroot=True),
        Case("permission", "decompress output in a read-only folder", ("decompress", "--run", "{R}", "{M}",
                                                                       "{C}/L/x.txt"),
             names="{C}/L/x.txt", setup=chain(locked, lock), nonroot=True),
        Case("permission", "eval: unreadable model.pt", ("eval", "--run", "{C}/R", "--data", "{D}"),
             names="{C}/R/model.pt", setup=chain(copy("R"), chmod("R/model.pt", 0)), nonroot=True),
        Case("permission", "eval: unreadable val shard", ("eval", "--run", "{R}", "--data", "{C}/D"),
             names="{C}/D/fineweb_val_000000.bin",
             setup=chain(copy("D"), chmod("D/fineweb_val_000000.bin", 0)), nonroot=True),
        Case("permission", "compress: unreadable input", ("compress", "--run", "{R}", "{C}/in.txt",
                                                          "{C}/x.mdz"),
             names="{C}/in.txt", setup=chain(files({"in.txt": b"text"}), chmod("in.txt", 0)), nonroot=True),
        Case("permission", "prepare: unreadable docs", ("prepare", "--docs", "{C}/docs.jsonl", "--tokenizer", "{T}",
                                                        "--out", "{C}/D", "--val-docs", "20"),
             names="{C}/docs.jsonl", setup=chain(copy("docs.jsonl"), chmod("docs.jsonl", 0)), nonroot=True),
    ]


def shard_cases() -> list[Case]:
    """Damaged shards: every reader checks magic, version, size, token range; one line naming the shard."""
    val = ("eval", "--run", "{R}", "--data", "{C}/D", "--num-seqs", "2", "--elbo-steps", "2")
    train = ("train", "--data", "{C}/D", "--out", "{C}/R", *TINY, "--steps", "2", "--no-eval")
    first_val, first_train = "{C}/D/fineweb_val_000000.bin", "{C}/D/fineweb_train_"
    damage = [("bad magic", header_word(0, 12345)), ("bad version", header_word(1, 7)),
              ("truncated to half", lambda d: d[:len(d) // 2 + 1]), ("truncated header", cut(100)),
              ("empty file", const(b"")), ("count says more", count_delta(10)),
              ("count says fewer", count_delta(-10)), ("negative count", header_word(2, -1)),
              ("token id 65535", token_at(5, 65535)), ("token id = vocab 1024", token_at(7, 1024)),
              ("random bytes", const(random.Random(SEED).randbytes(5000)))]
    cases = [Case("shards", f"val shard: {what}", val, names=first_val, setup=shards("val", fn), corrupt=True)
             for what, fn in damage]
    cases += [Case("shards", "one of two val shards: 0 tokens (the format allows it)", val, expect=CLEAN,
                   setup=shards("val", no_tokens)),
              Case("shards", "val split: every shard 0 tokens", val, names="{C}/D",
                   setup=shards("val", no_tokens, every=True), corrupt=True)]
    cases += [Case("shards", f"train shards: {what}", train, names=first_train,
                   setup=shards("train", fn, every=True), corrupt=True)
              for what, fn in damage if what in ("bad magic", "bad version", "truncated to half", "count says more",
                                                 "token id 65535", "random bytes")]
    cases += [Case("shards", "train shards: all 0 tokens", train, names="{C}/D",
                   setup=shards("train", no_tokens, every=True), corrupt=True),
              Case("shards", "a stray garbage shard not in the manifest", val, expect=OK,
                   setup=chain(copy("D"), files({"D/fineweb_val_999999.bin": b"garbage" * 200})))]
    return cases


def manifest_cases() -> list[Case]:
    """manifest.json not JSON, incomplete, pointing at missing or foreign files."""
    train = ("train", "--data", "{C}/D", "--out", "{C}/R", *TINY, "--steps", "1", "--no-eval")
    val = ("eval", "--run", "{R}", "--data", "{C}/D", "--num-seqs", "2", "--elbo-steps", "2")
    junk_model = files({"junk.model": random.Random(SEED + 1).randbytes(3000)})
    return [
        Case("manifest", "not JSON", train, names="{C}/D/manifest.json", setup=manifest(lambda m: "{not json")),
        Case("manifest", "empty file", train, names="{C}/D/manifest.json", setup=manifest(lambda m: "")),
        Case("manifest", "a JSON array", train, names="{C}/D/manifest.json", setup=manifest(lambda m: "[1, 2]")),
        Case("manifest", "binary junk", train, names="{C}/D/manifest.json",
             setup=chain(copy("D"), edit("D/manifest.json", const(b"\xff\xfe\x00junk")))),
        Case("manifest", "no tokenizer", train, names="tokenizer",
             setup=manifest(lambda m: json.dumps({k: v for k, v in m.items() if k != "tokenizer"}))),
        Case("manifest", "tokenizer not found", train, names="{C}/nope.model",
             setup=manifest(lambda m: json.dumps({**m, "tokenizer": "{C}/nope.model"}))),
        Case("manifest", "tokenizer is random bytes", train, names="{C}/junk.model",
             setup=chain(junk_model, manifest(lambda m: json.dumps({**m, "tokenizer": "{C}/junk.model"})))),
        Case("manifest", "--tokenizer is random bytes", ("train", "--data", "{D}", "--tokenizer", "{C}/junk.model",
                                                         "--out", "{C}/R", *TINY, "--steps", "1", "--no-eval"),
             names="{C}/junk.model", setup=junk_model),
        Case("manifest", "listed train shard missing", train, names="{C}/D/fineweb_train_000001.bin",
             setup=chain(copy("D"), unlink("D/fineweb_train_000001.bin"))),
        Case("manifest", "listed val shard missing", val, names="{C}/D/fineweb_val_000001.bin",
             setup=chain(copy("D"), unlink("D/fineweb_val_000001.bin"))),
        Case("manifest", "shard list not a list", val, names="{C}/D/manifest.json",
             setup=manifest(lambda m: json.dumps({**m, "val": {"shards": "fineweb_val_000000.bin"}}))),
        Case("manifest", "shard name escapes the folder", val, names="{C}/D/manifest.json",
             setup=manifest(lambda m: json.dumps({**m, "val": {"shards": ["../../etc/passwd"]}}))),
        Case("manifest", "empty val list", val, names="{C}/D",
             setup=manifest(lambda m: json.dumps({**m, "val": {"shards": []}}))),
        Case("manifest", "no manifest: train needs --tokenizer", train, names="manifest.json",
             setup=chain(copy("D"), unlink("D/manifest.json"))),
    ]


def docs_cases() -> list[Case]:
    """prepare's input: malformed JSONL, non-UTF-8, too few documents, a used output folder."""
    prep = ("prepare", "--docs", "{C}/docs.jsonl", "--tokenizer", "{T}", "--out", "{C}/D", "--val-docs", "2")
    bad = {"not JSON": b'{"text": "a"}\n{"text": "b"}\nnot json at all\n{"text": "c"}\n',
           "no text field": b'{"text": "a"}\n{"body": "b"}\n{"text": "c"}\n',
           "text not a string": b'{"text": "a"}\n{"text": 5}\n{"text": "c"}\n',
           "a JSON array line": b'{"text": "a"}\n[1, 2]\n{"text": "c"}\n',
           "invalid UTF-8": b'{"text": "a"}\n{"text": "caf\xe9"}\n{"text": "c"}\n',
           "empty file": b"",
           "random binary": random.Random(SEED + 2).randbytes(4000),
           "two docs for --val-docs 2": b'{"text": "a"}\n{"text": "b"}\n'}
    cases = [Case("docs", f"prepare: {what}", prep, names="{C}/docs.jsonl", setup=files({"docs.jsonl": content}),
                  corrupt=True, pristine=True) for what, content in bad.items()]
    used = chain(files({"D/notes.txt": b"my notes\n"}), copy("docs.jsonl"))
    good = ("prepare", "--docs", "{C}/docs.jsonl", "--tokenizer", "{T}", "--out", "{C}/D", "--val-docs", "20")
    cases += [
        Case("docs", "prepare into a non-empty folder", good, names="--overwrite", setup=used),
        Case("docs", "prepare into a data folder, a bad flag and --overwrite", (*good, "--overwrite",
                                                                                "--shard-tokens", "0"),
             names="--shard-tokens", setup=chain(copy("docs.jsonl"), copy("D"))),
        Case("docs", "prepare into a data folder without --overwrite", good, names="--overwrite",
             setup=chain(copy("docs.jsonl"), copy("D"))),
        Case("docs", "prepare --overwrite keeps files that are not shards", (*good, "--overwrite"), expect=OK,
             setup=used, mutable=("D/manifest.json", "D/fineweb_"), check=exists("D/notes.txt", "D/manifest.json")),
        Case("docs", "prepare with blank lines between docs", good, expect=CLEAN,
             setup=files({"docs.jsonl": b'{"text": "a"}\n\n{"text": "b"}\n\n' * 15})),
    ]
    return cases


def checkpoint_cases(ctx: Ctx) -> list[Case]:
    """Random bytes, truncation, flipped bits at several offsets, code-running pickles, NaN weights, crafted
    states: every one refused with one line naming the file, and no code run."""
    size = ctx.path("R/model.pt").stat().st_size
    rng = random.Random(SEED + 3)
    comment = len(CKPT_SEAL) + 64  # the seal: the zip comment, after its 2-byte length
    offsets = [0, 1, 3, 40, *sorted(rng.randrange(100, size - 200) for _ in range(5)), size - comment - 30,
               size - comment - 2, size - comment + 5, size - 1]  # zip entries, data, end record, seal
    readers = [("eval", ("eval", "--run", "{C}/R", "--data", "{D}", "--num-seqs", "2", "--elbo-steps", "2")),
               ("sample", ("sample", "--run", "{C}/R", "--length", "8", "--steps", "2")),
               ("export", ("export", "--run", "{C}/R", "--out", "{C}/A.bin")),
               ("compress", ("compress", "--run", "{C}/R", "{TXT}", "{C}/x.mdz"))]
    model = "{C}/R/model.pt"
    cases = [Case("checkpoint", f"model.pt bit {i % 8} flipped at byte {off} ({readers[i % 4][0]})",
                  readers[i % 4][1], names=model, setup=run_file("model.pt", flip(off, i % 8)), corrupt=True)
             for i, off in enumerate(offsets)]
    eval_run, resume = readers[0][1], ("train", "--resume", "{C}/R", "--data", "{D}", "--no-eval")
    ckpt = "{C}/R/checkpoint.pt"
    ckpt_size = ctx.path("R/checkpoint.pt").stat().st_size
    cases += [
        Case("checkpoint", "model.pt random bytes", eval_run, names=model,
             setup=run_file("model.pt", const(random.Random(SEED + 4).randbytes(5000))), corrupt=True),
        Case("checkpoint", "model.pt empty", readers[1][1], names=model, setup=run_file("model.pt", const(b"")),
             corrupt=True),
        Case("checkpoint", "model.pt truncated to half", eval_run, names=model,
             setup=run_file("model.pt", lambda d: d[:len(d) // 2]), corrupt=True),
        Case("checkpoint", "model.pt without its last byte", readers[2][1], names=model,
             setup=run_file("model.pt", cut(-1)), corrupt=True),
        Case("checkpoint", "model.pt is JSON", readers[3][1], names=model,
             setup=run_file("model.pt", const(b'{"format": "mdlm-golf-checkpoint-v1"}')), corrupt=True),
        Case("checkpoint", "checkpoint.pt bit flipped (resume)", resume, names=ckpt,
             setup=run_file("checkpoint.pt", flip(ckpt_size // 3, 5)), corrupt=True),
        Case("checkpoint", "checkpoint.pt truncated (resume)", resume, names=ckpt,
             setup=run_file("checkpoint.pt", cut(ckpt_size // 2)), corrupt=True),
        Case("checkpoint", "code-running pickle, sealed (eval)", eval_run, names=model, marker=True,
             setup=checkpoint("model.pt", poisoned), corrupt=True),
        Case("checkpoint", "code-running pickle as a weight, sealed (compress)", readers[3][1], names=model,
             marker=True, setup=checkpoint("model.pt", poisoned_weight), corrupt=True),
        Case("checkpoint", "code-running pickle, unsealed (sample)", readers[1][1], names=model, marker=True,
             setup=checkpoint("model.pt", poisoned, sealed=False), corrupt=True),
        Case("checkpoint", "code-running old-style pickle (export)", readers[2][1], names=model, marker=True,
             setup=checkpoint("model.pt", poisoned, legacy=True), corrupt=True),
        Case("checkpoint", "code-running pickle in checkpoint.pt (resume)", resume, names=ckpt, marker=True,
             setup=checkpoint("checkpoint.pt", poisoned), corrupt=True),
        Case("checkpoint", "NaN weight, sealed (eval)", eval_run, names=model,
             setup=checkpoint("model.pt", non_finite(float("nan"))), corrupt=True),
        Case("checkpoint", "inf weight, sealed (export)", readers[2][1], names=model,
             setup=checkpoint("model.pt", non_finite(float("inf"))), corrupt=True),
        Case("checkpoint", "NaN weight in checkpoint.pt (resume)", resume, names=ckpt,
             setup=checkpoint("checkpoint.pt", non_finite(float("nan"))), corrupt=True),
        Case("checkpoint", "NaN weight, sealed (sample)", readers[1][1], names=model,
             setup=checkpoint("model.pt", non_finite(float("nan"))), corrupt=True),
        Case("checkpoint", "sealed, wrong format tag", eval_run, names=model,
             setup=checkpoint("model.pt", state_with(format="something-else")), corrupt=True),
        Case("checkpoint", "sealed, model is a list", eval_run, names=model,
             setup=checkpoint("model.pt", state_with(model=[1, 2, 3])), corrupt=True),
        Case("checkpoint", "sealed, a list instead of a dict", readers[1][1], names=model,
             setup=checkpoint("model.pt", lambda s, c: [1, 2, 3]), corrupt=True),
        Case("checkpoint", "sealed, config says 3 layers", eval_run, names=model,
             setup=checkpoint("model.pt", config_with(num_layers=3)), corrupt=True),
        Case("checkpoint", "sealed, config steps -1", readers[1][1], names=model,
             setup=checkpoint("model.pt", config_with(steps=-1)), corrupt=True),
        Case("checkpoint", "sealed, config is a string", readers[2][1], names=model,
             setup=checkpoint("model.pt", state_with(config="oops")), corrupt=True),
        Case("checkpoint", "sealed, config has an unknown field", eval_run, names=model,
             setup=checkpoint("model.pt", config_with(bogus_field=1)), corrupt=True),
        Case("checkpoint", "a torch zip without the seal", eval_run, names=model,
             setup=checkpoint("model.pt", lambda s, c: s, sealed=False), corrupt=True),
    ]
    return cases


def artifact_cases(ctx: Ctx) -> list[Case]:
    """Flipped bytes in header, metadata, payload and CRC; truncations; crafted re-sealed files."""
    data = ctx.path("A.bin").read_bytes()
    meta_len = ART_HEADER.unpack_from(data)[2]
    payload_start = ART_HEADER.size + meta_len
    rng = random.Random(SEED + 5)
    offsets = {"magic": 0, "version": 8, "metadata length": 10, "metadata start": ART_HEADER.size,
               "metadata middle": ART_HEADER.size + meta_len // 2, "metadata end": payload_start - 1,
               "payload start": payload_start, **{f"payload {i}": rng.randrange(payload_start + 1, len(data) - 5)
                                                  for i in range(4)},
               "payload end": len(data) - 5, "CRC": len(data) - 2}
    readers = [("eval", ("eval", "--artifact", "{C}/A.bin", "--data", "{D}", "--num-seqs", "2",
                         "--elbo-steps", "2")),
               ("sample", ("sample", "--artifact", "{C}/A.bin", "--length", "8", "--steps", "2")),
               ("submission", ("submission", "--run", "{R}", "--artifact", "{C}/A.bin", "--data", "{D}",
                               "--out", "{C}/S", "--name", "x", "--github-id", "y", "--num-seqs", "2",
                               "--elbo-steps", "2"))]
    art = "{C}/A.bin"
    cases = [Case("artifact", f"byte flipped: {where} ({readers[i % 3][0]})", readers[i % 3][1], names=art,
                  setup=chain(copy("A.bin"), edit("A.bin", flip(off, 3))), corrupt=True)
             for i, (where, off) in enumerate(offsets.items())]
    cuts = {"10 bytes": 10, "header only": ART_HEADER.size, "half": len(data) // 2, "without the CRC": -4,
            "without its last byte": -1, "empty": 0}
    cases += [Case("artifact", f"truncated: {what} ({readers[i % 2][0]})", readers[i % 2][1], names=art,
                   setup=chain(copy("A.bin"), edit("A.bin", cut(keep))), corrupt=True)
              for i, (what, keep) in enumerate(cuts.items())]
    eval_art = readers[0][1]
    cases += [
        Case("artifact", "random bytes", eval_art, names=art,
             setup=files({"A.bin": random.Random(SEED + 6).randbytes(4000)}), corrupt=True),
        Case("artifact", "a checkpoint given as artifact", eval_art, names=art, setup=copy("R/model.pt", "A.bin"),
             corrupt=True),
        Case("artifact", "garbage appended", eval_art, names=art,
             setup=chain(copy("A.bin"), edit("A.bin", lambda d: d + b"extra")), corrupt=True),
        Case("artifact", "re-sealed: metadata not JSON", eval_art, names=art,
             setup=artifact(lambda m: b"{not json"), corrupt=True),
        Case("artifact", "re-sealed: metadata a JSON number", eval_art, names=art,
             setup=artifact(lambda m: b"5"), corrupt=True),
        Case("artifact", "re-sealed: tensor table garbage", eval_art, names=art,
             setup=artifact(meta_with(tensors="x")), corrupt=True),
        Case("artifact", "re-sealed: tensor entries garbage", readers[1][1], names=art,
             setup=artifact(meta_with(tensors=[{"name": "x"}])), corrupt=True),
        Case("artifact", "re-sealed: unknown compressor", eval_art, names=art,
             setup=artifact(meta_with(compressor="rar")), corrupt=True),
        Case("artifact", "re-sealed: config says 3 layers", eval_art, names=art,
             setup=artifact(meta_config(num_layers=3)), corrupt=True),
        Case("artifact", "re-sealed: config seq_len 0", readers[1][1], names=art,
             setup=artifact(meta_config(seq_len=0)), corrupt=True),
        Case("artifact", "re-sealed: config vocab 100", eval_art, names=art,
             setup=artifact(meta_config(vocab_size=100)), corrupt=True),
        Case("artifact", "re-sealed: payload_bytes a string", eval_art, names=art,
             setup=artifact(meta_with(payload_bytes="many")), corrupt=True),
        Case("artifact", "re-sealed: payload short of its tensors", eval_art, names=art,
             setup=artifact(fn_raw=lambda raw: raw[:-100]), corrupt=True),
        Case("artifact", "re-sealed: NaN weights", eval_art, names=art,
             setup=artifact(fn_raw=lambda raw: b"\xff" * len(raw)), corrupt=True),
        Case("artifact", "re-sealed: NaN weights (sample)", readers[1][1], names=art,
             setup=artifact(fn_raw=lambda raw: b"\xff" * len(raw)), corrupt=True),
    ]
    return cases


def mdz_cases(ctx: Ctx) -> list[Case]:
    """A .mdz flipped at several offsets, cut, padded, or decoded with the wrong model or tokenizer: refused
    (or, where the damage happens not to matter, the original rebuilt exactly); a file already at the
    output path is left as it was."""
    size, header = ctx.path("text.mdz").stat().st_size, ctx.mdz_header
    rng = random.Random(SEED + 7)
    offsets = {"magic": 0, "version": 4, "flags": 5, "order": 6, "first varint": 7, "varint 3": 9,
               "header 12": 12, "fingerprint": header - 10, "header CRC": header - 2, "first code byte": header,
               **{f"code {i}": rng.randrange(header + 1, size - 1) for i in range(3)}, "last byte": size - 1}
    dec = ("decompress", "--run", "{R}", "{C}/x.mdz", "{C}/out.txt")
    mdz = "{C}/x.mdz"
    cases = [Case("mdz", f"bit {i % 8} flipped: {where} (byte {off})", dec, expect=EXACT, names=mdz,
                  setup=chain(copy("text.mdz", "x.mdz"), edit("x.mdz", flip(off, i % 8))), corrupt=True,
                  output="out.txt") for i, (where, off) in enumerate(offsets.items())]
    cuts = {"3 bytes": 3, "header minus 1": header - 1, "header only": header, "half": size // 2,
            "without its last byte": -1, "empty": 0}
    cases += [Case("mdz", f"truncated: {what}", dec, expect=EXACT, names=mdz,
                   setup=chain(copy("text.mdz", "x.mdz"), edit("x.mdz", cut(keep))), corrupt=True, output="out.txt")
              for what, keep in cuts.items()]
    cases += [
        Case("mdz", "garbage appended", dec, expect=EXACT, names=mdz, output="out.txt", corrupt=True,
             setup=chain(copy("text.mdz", "x.mdz"), edit("x.mdz", lambda d: d + b"\x07garbage"))),
        Case("mdz", "random bytes", dec, names=mdz, corrupt=True,
             setup=files({"x.mdz": random.Random(SEED + 8).randbytes(3000)})),
        Case("mdz", "random bytes after the magic", dec, names=mdz, corrupt=True,
             setup=files({"x.mdz": b"MDZ1\x02" + random.Random(SEED + 9).randbytes(3000)})),
        Case("mdz", "a text file given as .mdz", dec, names=mdz, corrupt=True, setup=copy("text.txt", "x.mdz")),
        Case("mdz", "decoded with another run's model", ("decompress", "--run", "{R2}", "{M}", "{C}/out.txt"),
             names="{M}", corrupt=True),
        Case("mdz", "decoded with another tokenizer", ("decompress", "--run", "{R}", "--tokenizer", "{T2}", "{M}",
                                                       "{C}/out.txt"), names="{M}", corrupt=True),
        Case("mdz", "decoded with a junk tokenizer", ("decompress", "--run", "{R}", "--tokenizer", "{C}/junk.model",
                                                      "{M}", "{C}/out.txt"), names="{C}/junk.model", corrupt=True,
             setup=files({"junk.model": b"not a model"})),
        Case("mdz", "decoded with a run folder that has no model.pt", ("decompress", "--run", "{C}/E",
                                                                               "{M}", "{C}/out.txt"),
             names="{C}/E/model.pt", setup=files({"E": None})),
        Case("mdz", "corrupt .mdz onto an existing output file", dec, names=mdz, corrupt=True,
             setup=chain(copy("text.mdz", "x.mdz"), edit("x.mdz", flip(header + 3, 2)),
                         files({"out.txt": b"my precious file\n"}))),
        Case("mdz", "compressed with one run, decoded by another, onto an existing file",
             ("decompress", "--run", "{R2}", "{M}", "{C}/out.txt"), names="{M}", corrupt=True,
             setup=files({"out.txt": b"my precious file\n"})),
    ]
    return cases


def overwrite_cases() -> list[Case]:
    """Nothing lost: a run folder, a data folder, a resumed run's config are refused unless asked for."""
    new_run = ("train", "--data", "{D}", "--out", "{C}/R", *TINY, "--steps", "2", "--no-eval")
    resume = ("train", "--resume", "{C}/R", "--data", "{D}", "--no-eval")
    return [
        Case("overwrite", "train --out onto a finished run", new_run, names="--overwrite", setup=copy("R")),
        Case("overwrite", "train --out onto a run, --overwrite but a bad flag", (*new_run, "--overwrite",
                                                                                 "--steps", "-1"),
             names="steps", setup=copy("R")),
        Case("overwrite", "train --out onto a run, --overwrite but an unknown objective",
             (*new_run, "--overwrite", "--objective", "foo"), names="objective", setup=copy("R")),
        Case("overwrite", "train --out onto a run, --overwrite but missing data",
             ("train", "--data", "{C}/nodata", "--out", "{C}/R", *TINY, "--overwrite"), names="{C}/nodata",
             setup=copy("R")),
        Case("overwrite", "train --out onto a run, --overwrite but a missing --tokenizer",
             (*new_run, "--overwrite", "--tokenizer", "{C}/nope.model"), names="{C}/nope.model", setup=copy("R")),
        Case("overwrite", "train --out onto a run, --overwrite but corrupt train shards",
             ("train", "--data", "{C}/D", "--out", "{C}/R", *TINY, "--steps", "2", "--no-eval", "--overwrite"),
             names="{C}/D/fineweb_train_", setup=chain(copy("R"), shards("train", header_word(0, 1), every=True))),
        Case("overwrite", "prepare --overwrite, but the docs file is missing",
             ("prepare", "--docs", "{C}/nope.jsonl", "--tokenizer", "{T}", "--out", "{C}/D", "--val-docs", "20",
              "--overwrite"), names="{C}/nope.jsonl", setup=copy("D")),
        Case("overwrite", "prepare --overwrite, but the tokenizer is missing",
             ("prepare", "--docs", "{DOCS}", "--tokenizer", "{C}/nope.model", "--out", "{C}/D", "--val-docs", "20",
              "--overwrite"), names="{C}/nope.model", setup=copy("D")),
        Case("overwrite", "prepare --overwrite, but a bad line late in the docs",
             ("prepare", "--docs", "{C}/docs.jsonl", "--tokenizer", "{T}", "--out", "{C}/D", "--val-docs", "20",
              "--overwrite"), names="{C}/docs.jsonl",
             setup=chain(copy("D"), copy("docs.jsonl"), edit("docs.jsonl", lambda d: d + b"not json\n"))),
        Case("overwrite", "train --out onto a run that only has train.log", new_run, names="--overwrite",
             setup=files({"R/train.log": b"an old log I want\n"})),
        Case("overwrite", "resume: config.json model_dim changed", resume, names="model_dim",
             setup=config_json(lambda c: json.dumps({**c, "model_dim": 128}))),
        Case("overwrite", "resume: config.json not JSON", resume, names="{C}/R/config.json",
             setup=config_json(lambda c: "{oops")),
        Case("overwrite", "resume: config.json a JSON list", resume, names="{C}/R/config.json",
             setup=config_json(lambda c: "[]")),
        Case("overwrite", "resume: a model flag changed", (*resume, "--num-layers", "3"), names="num_layers",
             setup=copy("R")),
        Case("overwrite", "resume: an out-of-range flag", (*resume, "--steps", "0"), names="steps",
             setup=copy("R")),
        Case("overwrite", "resume: fewer steps than done", (*resume, "--steps", "2"), names="--steps 2",
             setup=copy("R")),
        Case("overwrite", "resume: config.json steps changed (allowed)", (*resume, "--steps", "6"), expect=OK,
             setup=config_json(lambda c: json.dumps({**c, "steps": 9})), mutable=("R/",),
             check=model_at("R/model.pt", 6)),
        Case("overwrite", "--resume and --out together", ("train", "--resume", "{C}/R", "--out", "{C}/R2",
                                                          "--data", "{D}", "--no-eval"),
             names="--out {C}/R2", setup=copy("R")),
        Case("overwrite", "--resume and --overwrite together", (*resume, "--overwrite"), names="--resume {C}/R",
             setup=copy("R")),
    ]


def fault_cases() -> list[Case]:
    """Signals to a running train, a killed run resumed, stale temporaries of killed writers."""
    long_run = ("train", "--data", "{D}", "--out", "{C}/R", *TINY, "--steps", "3000", "--batch-rows", "32",
                "--no-eval")
    resume = ("train", "--resume", "{C}/R", "--data", "{D}", "--no-eval", "--steps", "6", "--checkpoint-every", "1")
    return [
        Case("faults", "Ctrl-C once: checkpoint, clean exit, resumable", long_run, expect=OK, runner="signal",
             signal_plan=("once", signal.SIGINT), preamble=True),
        Case("faults", "SIGTERM: checkpoint, clean exit, resumable", long_run, expect=OK, runner="signal",
             signal_plan=("once", signal.SIGTERM)),
        Case("faults", "Ctrl-C twice: abort, exit 130", long_run, expect=INTERRUPTED, runner="signal",
             signal_plan=("twice", signal.SIGINT), preamble=True),
        Case("faults", "SIGKILL after a checkpoint, then --resume", (*long_run, "--checkpoint-every", "3"),
             expect=OK, runner="signal", signal_plan=("kill", signal.SIGKILL)),
        Case("faults", "Ctrl-C while the command starts up", long_run, expect=INTERRUPTED, runner="signal",
             signal_plan=("startup", signal.SIGINT), preamble=True),
        Case("faults", "stale checkpoint.pt temporary of a killed writer, resume", resume, expect=OK,
             setup=chain(copy("R"), stale_temp("R/checkpoint.pt", "dead"), stale_temp("R/model.pt", "dead")),
             mutable=("R/",), check=checks(no_temp_left("R"), model_at("R/model.pt", 6))),
        Case("faults", "a live writer's temporary is left alone", resume, expect=OK,
             setup=chain(copy("R"), stale_temp("R/checkpoint.pt", "live")), mutable=("R/",),
             check=checks(live_temp_kept("R"), model_at("R/model.pt", 6))),
        Case("faults", "eval with a stale temporary beside model.pt", ("eval", "--run", "{C}/R", "--data", "{D}",
                                                                       "--num-seqs", "2", "--elbo-steps", "2"),
             expect=OK, setup=chain(copy("R"), stale_temp("R/model.pt", "dead"))),
        Case("faults", "export over an existing artifact (atomic replace)", ("export", "--run", "{R}", "--out",
                                                                             "{C}/A.bin"),
             expect=OK, setup=copy("A.bin"), mutable=("A.bin",), check=exists("A.bin")),
    ]


def download_cases() -> list[Case]:
    """download without a reachable Hub: one line naming the endpoint, nothing left half-written."""
    dl = ("download", "--train-shards", "1", "--out", "{C}/dl", "--quiet")
    return [
        Case("download", "endpoint refuses connections", dl, names="127.0.0.1"),
        Case("download", "HF_HUB_OFFLINE=1", dl, names="offline", env=(("HF_HUB_OFFLINE", "1"),)),
        Case("download", "endpoint not a URL", dl, names="not-a-url", env=(("HF_ENDPOINT", "not-a-url"),)),
        Case("download", "endpoint answers 404", dl, names="{HTTP}/missing",
             env=(("HF_ENDPOINT", "{HTTP}/missing"),)),
        Case("download", "endpoint answers junk (not a Hub)", dl, names="{HTTP}/garbage",
             env=(("HF_ENDPOINT", "{HTTP}/garbage"),)),
        Case("download", "--repo-id nonsense", (*dl, "--repo-id", "no/such/repo//x"), names="no/such/repo//x",
             env=(("HF_ENDPOINT", "{HTTP}/missing"),)),
        Case("download", "--variant with a path", (*dl, "--variant", "../../etc"), names="",
             env=(("HF_ENDPOINT", "{HTTP}/missing"),)),
    ]


def sanity_cases() -> list[Case]:
    """Each command once with good inputs: the refusals above come from the bad input, not a broken setup."""
    return [
        Case("sanity", "prepare", ("prepare", "--docs", "{DOCS}", "--tokenizer", "{T}", "--out", "{C}/D",
                                   "--val-docs", "20"), expect=OK, check=exists("D/manifest.json")),
        Case("sanity", "train", ("train", "--data", "{D}", "--out", "{C}/R", *TINY, "--steps", "2",
                                 "--eval-num-seqs", "2", "--elbo-steps", "2"), expect=OK, check=exists("R/model.pt")),
        Case("sanity", "eval --run", ("eval", "--run", "{R}", "--data", "{D}", "--num-seqs", "2", "--elbo-steps",
                                      "2", "--json", "{C}/e.json"), expect=OK, check=exists("e.json")),
        Case("sanity", "eval --artifact", ("eval", "--artifact", "{A}", "--data", "{D}", "--num-seqs", "2",
                                           "--elbo-steps", "2"), expect=OK),
        Case("sanity", "eval --method planned", ("eval", "--run", "{R}", "--data", "{D}", "--num-seqs", "2",
                                                 "--method", "planned", "--passes", "8"), expect=OK),
        Case("sanity", "sample --artifact", ("sample", "--artifact", "{A}", "--length", "16", "--steps", "4"),
             expect=OK),
        Case("sanity", "export", ("export", "--run", "{R}", "--out", "{C}/A.bin"), expect=OK, check=exists("A.bin")),
        Case("sanity", "submission", ("submission", "--run", "{R}", "--artifact", "{A}", "--data", "{D}", "--out",
                                      "{C}/S", "--name", "hostile", "--github-id", "nobody", "--num-seqs", "2",
                                      "--elbo-steps", "2"), expect=OK, check=exists("S")),
        Case("sanity", "ablate", ("ablate", "--param", "lr", "--values", "1e-3,2e-3", "--data", "{D}", "--out",
                                  "{C}/O", *TINY, "--steps", "2", "--eval-num-seqs", "2", "--elbo-steps", "2"),
             expect=OK),
        Case("sanity", "race", ("race", "--recipes", "today,ar", "--seeds", "1", "--data", "{D}", "--out", "{C}/O",
                                *TINY, "--steps", "2", "--eval-num-seqs", "2", "--elbo-steps", "2"), expect=OK),
    ]


def roundtrip_cases(ctx: Ctx) -> list[Case]:
    """compress then decompress through the CLI: the same bytes back, whatever they are."""
    cases = [Case("roundtrip", name, (), expect=OK, runner="roundtrip", data=data) for name, data in ctx.texts.items()]
    variants = [("--mode", "strict"), ("--order", "confidence"), ("--order", "margin"), ("--tokens-per-pass", "8"),
                ("--passes", "1")]
    picks = ["invalid-utf8", "emoji", "whitespace", "nfkc-changes", next(iter(ctx.texts))]
    cases += [Case("roundtrip", f"{name} {' '.join(flags)}", flags, expect=OK, runner="roundtrip",
                   data=ctx.texts[name]) for name, flags in zip(picks, variants)]
    return cases


def all_cases(ctx: Ctx) -> list[Case]:
    return [*sanity_cases(), *flag_cases(), *missing_cases(), *directory_cases(), *under_file_cases(),
            *permission_cases(), *shard_cases(), *manifest_cases(), *docs_cases(), *checkpoint_cases(ctx),
            *artifact_cases(ctx), *mdz_cases(ctx), *overwrite_cases(), *fault_cases(), *download_cases(),
            *roundtrip_cases(ctx)]


# ---------------------------------------------------------------- running and judging one case

def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder, by relative path (what 'data lost' compares)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            try:
                out[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError:
                out[str(path.relative_to(folder))] = "unreadable"
    return out


def lost_files(before: dict[str, str], after: dict[str, str], mutable: tuple[str, ...]) -> list[str]:
    return [f"{rel} {'vanished' if rel not in after else 'changed'}" for rel, digest in before.items()
            if after.get(rel) != digest and not rel.startswith(mutable or ("\0",))]


def run_signal(ctx: Ctx, case: Case, c: Path, argv: list[str], env: dict[str, str]) -> tuple[Result, list[str]]:
    """Start a long train, signal it as planned, then check the checkpoint and resume from it."""
    kind, sig = case.signal_plan
    run, problems = c / "R", []
    out, err = open(c / "stdout.txt", "wb"), open(c / "stderr.txt", "wb")
    began = time.monotonic()
    proc = subprocess.Popen(ctx.command + argv, cwd=c, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    try:
        if kind == "startup":
            time.sleep(0.4)
        elif not wait_for(proc, lambda: lines(run / "metrics.jsonl") >= (8 if kind == "kill" else 3)
                          and (kind != "kill" or (run / "checkpoint.pt").is_file())):
            problems.append(f"train exited (code {proc.returncode}) or stalled before the signal")
        if proc.poll() is None:
            proc.send_signal(sig)
            if kind == "twice":
                time.sleep(0.05)
                proc.send_signal(sig)
        code = proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
        problems.append("did not stop within 120 s of the signal")
    finally:
        out.close()
        err.close()
    text = lambda name: (c / name).read_text("utf-8", "replace")  # noqa: E731
    res = Result(code, text("stdout.txt"), text("stderr.txt"), time.monotonic() - began)
    if kind in ("once", "kill") and not problems:
        problems += resume_after_signal(ctx, case, c, res, env)
        if kind == "kill":  # the case's verdict is the resume's
            res = Result(0 if not problems else 1, res.stdout, "", res.seconds)
    return res, problems


def wait_for(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 180) -> bool:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def lines(path: Path) -> int:
    try:
        return path.read_text().count("\n")
    except OSError:
        return 0


def resume_after_signal(ctx: Ctx, case: Case, c: Path, res: Result, env: dict[str, str]) -> list[str]:
    """A signalled run leaves a checkpoint (no model.pt) that --resume carries to the end."""
    run, kind = c / "R", case.signal_plan[0]
    ckpt = run / "checkpoint.pt"
    if not ckpt.is_file():
        return ["no checkpoint.pt after the signal"]
    problems = []
    if kind == "once" and (run / "model.pt").exists():
        problems.append("model.pt written although the run was stopped early")
    if kind == "once" and case.signal_plan[1].name not in (run / "train.log").read_text():
        problems.append(f"train.log does not say it stopped on {case.signal_plan[1].name}")
    saved = step_of(ckpt)
    back = run_cli(ctx, ["train", "--resume", str(run), "--data", str(ctx.path("D")), "--no-eval",
                         "--steps", str(saved + 2)], c, env)
    if back.code != 0 or "Traceback" in back.stderr:
        problems.append(f"--resume exited {back.code}: {tail(back.stderr)}")
    elif step_of(run / "model.pt") != saved + 2:
        problems.append("resumed model.pt is not at the asked step")
    return problems


def run_roundtrip(ctx: Ctx, case: Case, c: Path, env: dict[str, str]) -> tuple[Result, list[str]]:
    """compress IN -> x.mdz -> decompress -> back; both exit 0 and back == IN byte for byte."""
    (c / "in.bin").write_bytes(case.data)
    first = run_cli(ctx, ["compress", "--run", str(ctx.path("R")), *case.argv, str(c / "in.bin"), str(c / "x.mdz")],
                    c, env)
    if first.code != 0:
        return first, [f"compress exited {first.code}"]
    second = run_cli(ctx, ["decompress", "--run", str(ctx.path("R")), str(c / "x.mdz"), str(c / "back.bin")], c, env)
    res = Result(second.code, first.stdout + second.stdout, first.stderr + second.stderr,
                 first.seconds + second.seconds)
    if second.code != 0:
        return res, [f"decompress exited {second.code}"]
    back = (c / "back.bin").read_bytes()
    if back != case.data:
        at = next((i for i, (a, b) in enumerate(zip(back, case.data)) if a != b), min(len(back), len(case.data)))
        return res, [f"round trip differs: {len(case.data)} bytes in, {len(back)} out, first difference at {at}"]
    return res, []


def tail(text: str, count: int = 3) -> str:
    return " | ".join([line for line in text.splitlines() if line.strip()][-count:])


def judge(ctx: Ctx, case: Case, c: Path, res: Result, out: Outcome) -> None:
    """Apply the case's expectation to what the command did."""
    err_lines = [line for line in res.stderr.splitlines() if line.strip()]
    last = err_lines[-1] if err_lines else ""
    places = ctx.places(c)
    out.traceback = "Traceback" in res.stderr or "Traceback" in res.stdout
    out.one_line = len(err_lines) == 1 and bool(ERROR_LINE.match(last))
    if out.traceback:
        out.problems.append("traceback")
    if res.code is None:
        out.problems.append("hung: killed after the timeout")
        return
    if res.code < 0:
        out.problems.append(f"killed by signal {-res.code}")
    refused = res.code == 2 and case.expect in (REFUSE, EXACT, CLEAN)
    if case.expect == OK and res.code != 0:
        out.problems.append(f"exit {res.code}, expected 0")
    elif case.expect in (REFUSE,) and res.code != 2:
        out.problems.append(f"exit {res.code}, expected 2 (refuse)")
    elif case.expect == EXACT and res.code not in (0, 2):
        out.problems.append(f"exit {res.code}, expected 2 (refuse) or 0 with the original bytes")
    elif case.expect == CLEAN and res.code not in (0, 2):
        out.problems.append(f"exit {res.code}, expected 0 or 2")
    elif case.expect == INTERRUPTED and (res.code != 130 or not INTERRUPT_LINE.match(last)):
        out.problems.append(f"exit {res.code} / last line {last!r}, expected 130 and `mdlm-golf CMD: interrupted`")
    if refused:
        judge_refusal(case, c, err_lines, last, places, out)
    if case.expect == EXACT and res.code == 0:
        produced = (c / case.output).read_bytes() if (c / case.output).is_file() else None
        if produced != ctx.path("text.txt").read_bytes():
            out.corruption_accepted = True
            out.problems.append("a corrupted .mdz decoded to different bytes with exit 0")
    elif case.corrupt and res.code == 0:
        out.corruption_accepted = True
        out.problems.append("corrupted input accepted (exit 0)")


def judge_refusal(case: Case, c: Path, err_lines: list[str], last: str, places: dict[str, str],
                  out: Outcome) -> None:
    """A refusal: one line `mdlm-golf CMD: error: ...` naming what is wrong."""
    if not ERROR_LINE.match(last):
        out.problems.append(f"last stderr line is not `mdlm-golf CMD: error: ...`: {last!r}")
    elif len(err_lines) != 1 and not case.preamble:
        out.problems.append(f"{len(err_lines)} lines on stderr, expected one")
    names = fill(case.names, places)
    if names and names not in last:
        out.named = False
        out.problems.append(f"the error line does not name {names!r}")


def run_case(ctx: Ctx, case: Case, index: int) -> Outcome:
    """Set the case up in its own folder, run it, judge it, and check nothing existing was lost."""
    c = ctx.work / "cases" / f"{index:03d}"
    c.mkdir(parents=True)
    places = ctx.places(c)
    argv = [fill(a, places) for a in case.argv]
    out = Outcome(case.category, case.name, case.expect, " ".join(["mdlm-golf", *argv]))
    if case.nonroot and ctx.root:
        out.skipped = "running as root: file permissions do not apply"
        return out
    env = {**ctx.env, **{k: fill(v, places) for k, v in case.env}}
    if case.setup:
        case.setup(ctx, c)
        fill_literal_placeholders(c, places)
    base_before, before = snapshot(ctx.base), snapshot(c)
    if case.runner == "signal":
        res, extra = run_signal(ctx, case, c, argv, env)
    elif case.runner == "roundtrip":
        res, extra = run_roundtrip(ctx, case, c, env)
        out.argv = f"mdlm-golf compress/decompress {' '.join(argv)} [{case.name}]"
    else:
        res, extra = run_cli(ctx, argv, c, env), []
    out.exit, out.seconds, out.stderr_tail = res.code, round(res.seconds, 2), tail(res.stderr, 4)
    judge(ctx, case, c, res, out)
    out.problems += extra
    if case.check and res.code == 0 and not extra:
        out.problems += case.check(ctx, c)
    after = snapshot(c)
    out.data_lost = lost_files(before, after, case.mutable)
    out.data_lost += [f"shared input {p}" for p in lost_files(base_before, snapshot(ctx.base), ())]
    if out.data_lost:
        out.problems.append(f"data lost: {', '.join(out.data_lost[:5])}")
    if case.pristine and res.code == 2 and set(after) - set(before):
        out.problems.append(f"refused but wrote {sorted(set(after) - set(before))[:3]}")
    if case.marker:
        out.code_ran = (c / "PWNED").exists()
        if out.code_ran:
            out.problems.append("the pickle's code ran (PWNED marker written)")
    restore_permissions(c)
    return out


def fill_literal_placeholders(c: Path, places: dict[str, str]) -> None:
    """Setups that write JSON naming case files (a manifest's tokenizer) write '{C}': fill it in here."""
    manifest_path = c / "D" / "manifest.json"
    if manifest_path.is_file():
        text = manifest_path.read_text(errors="replace")
        if "{C}" in text:
            manifest_path.write_text(fill(text, places))


def restore_permissions(c: Path) -> None:
    """Make the case folder deletable again after permission cases."""
    for path in [c, *c.rglob("*")]:
        try:
            os.chmod(path, 0o700 if path.is_dir() else 0o600)
        except OSError:
            pass


# ---------------------------------------------------------------- report

COLUMNS = ("cases", "skipped", "pass", "FAIL", "traceback", "data lost", "corruption accepted", "code ran")


def tally(outcomes: list[Outcome]) -> list[int]:
    run = [o for o in outcomes if not o.skipped]
    return [len(outcomes), len(outcomes) - len(run), sum(o.passed for o in run), sum(not o.passed for o in run),
            sum(o.traceback for o in run), sum(bool(o.data_lost) for o in run),
            sum(o.corruption_accepted for o in run), sum(o.code_ran for o in run)]


def table(outcomes: list[Outcome]) -> str:
    """Per category and in total: cases, skipped, passes, failures, and the four things that must be 0."""
    categories = list(dict.fromkeys(o.category for o in outcomes))
    rows = [[cat, *tally([o for o in outcomes if o.category == cat])] for cat in categories]
    rows.append(["TOTAL", *tally(outcomes)])
    widths = [max(len(str(r[i])) for r in [["category", *COLUMNS], *rows]) for i in range(len(COLUMNS) + 1)]
    fmt = lambda r: "| " + " | ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w)  # noqa: E731
                                      for i, (v, w) in enumerate(zip(r, widths))) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(["category", *COLUMNS]), sep, *map(fmt, rows[:-1]), sep, fmt(rows[-1])])


def failures(outcomes: list[Outcome]) -> str:
    lines = []
    for o in outcomes:
        if not o.skipped and not o.passed:
            lines += [f"FAIL {o.category} / {o.name}", f"  command:  {o.argv}", f"  expected: {o.expect}; got exit "
                      f"{o.exit}", f"  problems: {'; '.join(o.problems)}", f"  stderr:   {o.stderr_tail}"]
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, help="work folder (kept); default a temporary folder, removed at the end")
    p.add_argument("--json", type=Path, help="write the per-case results here")
    p.add_argument("--only", action="append", default=[],
                   help="run only cases whose 'category / name' contains this text (repeatable)")
    p.add_argument("--list", action="store_true", help="list the cases and exit (after the setup)")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    torch.set_num_threads(1)
    began = time.monotonic()
    work = args.work or Path(tempfile.mkdtemp(prefix="hostile-"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        raise SystemExit(f"hostile: {work} is not empty; give a new or empty --work folder")
    ctx = Ctx(work=work, base=work / "base", command=cli_command(), env=clean_env(work), root=os.geteuid() == 0)
    ctx.http_port = start_http()
    print(f"hostile: work folder {work}; CLI {' '.join(ctx.command)}", file=sys.stderr)
    try:
        build_base(ctx)
        cases = [c for c in all_cases(ctx) if not args.only or any(t in f"{c.category} / {c.name}" for t in args.only)]
        if args.list:
            print("\n".join(f"{c.category} / {c.name}" for c in cases))
            return 0
        outcomes = []
        for i, case in enumerate(cases, 1):
            outcome = run_case(ctx, case, i)
            outcomes.append(outcome)
            status = "skip" if outcome.skipped else "pass" if outcome.passed else "FAIL"
            detail = "" if outcome.passed or outcome.skipped else f"  <- {'; '.join(outcome.problems)}"
            print(f"[{i:3d}/{len(cases)}] {status} {case.category} / {case.name} (exit {outcome.exit}, "
                  f"{outcome.seconds:.1f}s){detail}", file=sys.stderr, flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    minutes = (time.monotonic() - began) / 60
    print(table(outcomes))
    print(f"\n{len(outcomes)} cases in {minutes:.1f} min; one_line (exactly one stderr line) on "
          f"{sum(o.one_line for o in outcomes if o.exit == 2)} of {sum(o.exit == 2 for o in outcomes)} exits 2")
    if any(not o.skipped and not o.passed for o in outcomes):
        print("\n" + failures(outcomes))
    if args.json:
        args.json.write_text(json.dumps({"summary": dict(zip(COLUMNS, tally(outcomes))), "minutes": round(minutes, 2),
                                         "cases": [{**asdict(o), "passed": o.passed} for o in outcomes]}, indent=1))
    return 1 if any(not o.skipped and not o.passed for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
