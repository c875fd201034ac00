"""The acceptance battery's engine: every command tried as a careless or hostile user would, as real
subprocesses (issue 12). tests/acceptance/test_*.py hold the cases, one module per category; pytest runs
them (`python -m pytest tests/acceptance`) and so does `python tests/acceptance/battery.py`, which prints
the table BENCHMARKS.md quotes.

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

Cases are data (Case records built by small factories); corruption offsets come from a seeded
generator, so two runs try the same bytes. Permission cases are skipped (and counted) as root, who
ignores file modes.
"""
from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from mdlm_golf.config import field_types  # only to strip config env vars (STEPS=...) from the environment

from .mutators import Check, RunsCode, Setup, step_of

REPO = Path(__file__).resolve().parents[2]
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
AS_ROOT = "running as root: root ignores file modes"


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


@dataclass(frozen=True)
class Slot:
    """A case as pytest collects it, before the shared inputs exist: an id, and how to make the case from
    the built inputs. Most cases are fixed in advance (id = name); the few whose name gives a byte offset
    into a built file name it by what it hits (the offset itself is only known once the file is built)."""
    id: str
    make: Callable[[Ctx], Case]


def fixed(cases: list[Case]) -> list[Slot]:
    """Slots for cases that need nothing from the built inputs: the id is the case's name."""
    return [Slot(case.name, lambda ctx, case=case: case) for case in cases]


def slot_id(slot: Slot) -> str:
    """pytest's id for a slot (parametrize's ids=)."""
    return slot.id


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


def new_ctx(work: Path) -> Ctx:
    """A context over an empty work folder: the installed CLI, a clean environment, a local not-a-Hub."""
    return Ctx(work=work, base=work / "base", command=cli_command(), env=clean_env(work), root=os.geteuid() == 0,
               http_port=start_http())


# ---------------------------------------------------------------- building the shared inputs

class SetupError(RuntimeError):
    """The shared inputs could not be built: the battery is meaningless on broken inputs."""


def must(res: Result, what: str) -> Result:
    """Setup steps must succeed."""
    if res.code != 0:
        raise SetupError(f"hostile: setup failed at {what} (exit {res.code})\n{res.stdout[-2000:]}\n"
                         f"{res.stderr[-3000:]}")
    return res


@functools.cache  # build_base and the roundtrip cases both read them
def held_out_docs(count: int = 10) -> tuple[str, ...]:
    """Documents from the end of the shared corpus, never in the fixture (which holds its first 1,187)."""
    if not HELD_OUT.is_file():
        return ()
    lines = HELD_OUT.read_text(encoding="utf-8").splitlines()
    picked = []
    for line in reversed(lines[FIXTURE_COUNT:]):
        text = json.loads(line)["text"]
        if 300 <= len(text.encode()) <= 4000:
            picked.append(text)
        if len(picked) == count:
            break
    return tuple(picked)


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
    log("checking that the code-running pickle is live (loaded with weights_only=False elsewhere)")
    prove_payload_live(ctx)


def round_trip_inputs(held: tuple[str, ...]) -> dict[str, bytes]:
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


def prove_payload_live(ctx: Ctx) -> None:
    """The code_ran cases mean something only if the payload does run when a careless loader unpickles it."""
    probe_dir = ctx.work / "probe"
    probe_dir.mkdir()
    evil, marker = probe_dir / "evil.pt", probe_dir / "RAN"
    torch.save({"x": RunsCode(marker)}, evil)
    code = f"import torch; torch.load({str(evil)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], env=ctx.env, capture_output=True, timeout=TIMEOUT)
    if not marker.exists():
        raise SetupError("hostile: the code-running pickle did not run even with weights_only=False")
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


def case_dir(ctx: Ctx, index: int) -> Path:
    return ctx.work / "cases" / f"{index:03d}"


def run_case(ctx: Ctx, case: Case, index: int) -> Outcome:
    """Set the case up in its own folder, run it, judge it, and check nothing existing was lost."""
    c = case_dir(ctx, index)
    c.mkdir(parents=True)
    places = ctx.places(c)
    argv = [fill(a, places) for a in case.argv]
    out = Outcome(case.category, case.name, case.expect, " ".join(["mdlm-golf", *argv]))
    if case.nonroot and ctx.root:
        out.skipped = AS_ROOT
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


def describe(o: Outcome) -> str:
    """A failed case: its command, what was expected, the problems and the end of its stderr."""
    return "\n".join([f"FAIL {o.category} / {o.name}", f"  command:  {o.argv}",
                      f"  expected: {o.expect}; got exit {o.exit}", f"  problems: {'; '.join(o.problems)}",
                      f"  stderr:   {o.stderr_tail}"])


def failed(outcomes: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if not o.skipped and not o.passed]


def report(outcomes: list[Outcome], minutes: float) -> str:
    """The table, how many refusals were one line, and every failure."""
    exits_2 = [o for o in outcomes if o.exit == 2]
    parts = [table(outcomes), f"\n{len(outcomes)} cases in {minutes:.1f} min; one_line (exactly one stderr line) on "
             f"{sum(o.one_line for o in exits_2)} of {len(exits_2)} exits 2"]
    if failed(outcomes):
        parts.append("\n" + "\n".join(map(describe, failed(outcomes))))
    return "\n".join(parts)


def results_json(outcomes: list[Outcome], minutes: float) -> str:
    """The summary row and every case's outcome."""
    return json.dumps({"summary": dict(zip(COLUMNS, tally(outcomes))), "minutes": round(minutes, 2),
                       "cases": [{**asdict(o), "passed": o.passed} for o in outcomes]}, indent=1)
