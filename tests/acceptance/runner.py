"""The acceptance battery's engine: every command tried as a careless or hostile user would, as real
subprocesses (issue 12). tests/acceptance/test_*.py hold the cases, one module per category; pytest runs
them (`python -m pytest tests/acceptance`) and so does `python tests/acceptance/battery.py`, which prints
the table BENCHMARKS.md quotes.

It builds real inputs first (a data folder prepared from tests/fixtures, a tiny trained run with a
checkpoint, a second run, exported artifacts, a compressed .mdz), then runs each case as its own
`mdlm-golf ...` subprocess (OMP_NUM_THREADS=1, no GPU, HF_ENDPOINT on a closed local port: nothing
leaves the machine) in its own folder, one at a time, and judges it:

  traceback            "Traceback" on stderr or stdout: always a failure.
  exit                 the exit code the expectation names (2 for a refusal, 0, 130 for Ctrl-C, 143
                       for SIGTERM).
  one_line             a refusal prints exactly one non-empty line on stderr,
                       `mdlm-golf CMD: error: ...` (argparse's own errors: `mdlm-golf CMD: error:
                       argument ...`), and that line names the file or field at fault (the case's
                       `names`; several texts: each of them). Cases marked `preamble` (Ctrl-C, which
                       first prints "stopping ...") only need the LAST stderr line to be that line.
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
checks, which run once the command did what was expected, a refusal too: a file exists, a model is at a
step, a temporary is gone); "refuse-or-exact" (corrupted .mdz);
"clean" = exit 0 or 2, either being legitimate (e.g. --num-seqs beyond the split), but never a
traceback; "exit-130" = `mdlm-golf CMD: interrupted` and exit 130; "exit-143" = `mdlm-golf CMD: terminated
(SIGTERM)` and exit 143; "run-exit-130" / "run-exit-143" = a race's or an ablation's run stopped by SIGINT /
SIGTERM: `mdlm-golf CMD: interrupted: SIGxxx received; RUN/checkpoint.pt ...` and exit 130 / 143 (one line
unless `preamble`, naming the case's `names`). As the README says, a FIRST Ctrl-C
(or SIGTERM) to train is a clean stop: exit 0 with RUN/checkpoint.pt and no model.pt, which --resume
then carries to the end; a second Ctrl-C aborts with 130. "roundtrip" cases run compress then
decompress and need the exact input bytes back (held-out documents are taken from the end of
../shared/data/docs_selected.jsonl, past the fixture's first 1,187, when it exists).

Signal cases ("signal" runner) start the command, wait for its moment (a run's metrics.jsonl growing, or
some CPU seconds of work), send the signal and judge the exit; "after" plans may bound how long the command
takes to end once signalled, and "rerun" plans run the same race or ablation again, which must resume the
stopped run and finish. Full-disk cases (`disk_free`) run on a small tmpfs mounted at {C}/disk and filled
but for that many bytes (skipped, with the reason, where mounting fails: it needs root on Linux).
Crafted-size cases run under an address-space limit (`memory`) and a time limit (`within`): a size read
from a file must be checked before anything is allocated for it.

Cases are data (Case records built by small factories); corruption offsets come from a seeded
generator, so two runs try the same bytes. Permission cases are skipped (and counted) as root, who
ignores file modes.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import http.server
import json
import os
import re
import resource
import shutil
import socket
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

# the package is used only to build inputs a case needs and cannot otherwise make (a model much larger than
# the tiny runs), and to strip config env vars (STEPS=...) from the environment
from mdlm_golf.checkpoint import save_checkpoint
from mdlm_golf.config import build_config, field_types
from mdlm_golf.model import Transformer

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
TERMINATED, RUN_INTERRUPTED, RUN_TERMINATED = "exit-143", "run-exit-130", "run-exit-143"
ERROR_LINE = re.compile(r"^mdlm-golf(?: [a-z]+)?: error: .+$")
INTERRUPT_LINE = re.compile(r"^mdlm-golf [a-z]+: interrupted$")
# what a signalled command must end with: (exit status, its last stderr line, that line as the report says it)
SIGNALLED: dict[str, tuple[int, re.Pattern, str]] = {
    INTERRUPTED: (130, INTERRUPT_LINE, "`mdlm-golf CMD: interrupted`"),
    TERMINATED: (143, re.compile(r"^mdlm-golf [a-z]+: terminated \(SIGTERM\)$"),
                 "`mdlm-golf CMD: terminated (SIGTERM)`"),
    RUN_INTERRUPTED: (130, re.compile(r"^mdlm-golf [a-z]+: interrupted: SIGINT received; .+/checkpoint\.pt"),
                      "`mdlm-golf CMD: interrupted: SIGINT received; RUN/checkpoint.pt ...`"),
    RUN_TERMINATED: (143, re.compile(r"^mdlm-golf [a-z]+: interrupted: SIGTERM received; .+/checkpoint\.pt"),
                     "`mdlm-golf CMD: interrupted: SIGTERM received; RUN/checkpoint.pt ...`"),
}
HEADER_BYTES_RE = re.compile(r"header (\d+) bytes")
AS_ROOT = "running as root: root ignores file modes"
SUMMARY_NAME = "train_summary.json"  # a race's or an ablation's finished run has one; a stopped run none
DISK, DISK_SIZE, FILLER = "disk", "16m", "filler"  # a full-disk case's tmpfs ({C}/disk), its size, what fills it


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

    def built(self, name: str) -> Path:
        """An input only some cases need (BUILDERS), built under work/built on first use: beside the base
        rather than in it, so the other cases neither wait for it nor hash it."""
        path = self.work / "built" / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            BUILDERS[name](self, path)
        return path

    def places(self, case_dir: Path) -> dict[str, str]:
        """What each {PLACE} stands for in a case's argv and names ({X}: the inputs Ctx.built makes)."""
        b = self.base
        return {"{D}": str(b / "D"), "{R}": str(b / "R"), "{R2}": str(b / "R2"), "{A}": str(b / "A.bin"),
                "{AZ}": str(b / "AZ.bin"), "{T}": str(TOKENIZER), "{T2}": str(b / "D2" / "tokenizer.model"),
                "{DOCS}": str(b / "docs.jsonl"), "{M}": str(b / "text.mdz"), "{TXT}": str(b / "text.txt"),
                "{C}": str(case_dir), "{HTTP}": f"http://127.0.0.1:{self.http_port}",
                "{X}": str(self.work / "built")}


@dataclass(frozen=True)
class Case:
    """One hostile try: a command line, what it must do, and how its inputs are made."""
    category: str
    name: str
    argv: tuple[str, ...]
    expect: str = REFUSE
    names: str | tuple[str, ...] = ""  # text (each text) the error line must contain ({C}, {D}, ... allowed)
    setup: Setup | None = None
    corrupt: bool = False  # a damaged input: exit 0 is corruption accepted
    marker: bool = False  # a code-running pickle: {C}/PWNED must not appear
    pristine: bool = False  # a refusal must create nothing in the case folder
    preamble: bool = False  # lines before the final error/interrupted line are allowed
    mutable: tuple[str, ...] = ()  # case-folder paths (prefixes) the command may change
    env: tuple[tuple[str, str], ...] = ()
    nonroot: bool = False  # needs file permissions to mean something
    output: str = ""  # for EXACT: the file the command writes, compared with the original text
    check: Check | None = None  # further checks once the command did what was expected
    runner: str = "cli"  # cli | roundtrip | signal
    data: bytes = b""  # round-trip input
    signal_plan: tuple = ()  # (kind, signal, ...) for runner == "signal" (run_signal)
    watch: str = "R"  # the run folder (in the case folder) a signal case watches and checks
    disk_free: int | None = None  # bytes left free on a tmpfs at {C}/disk once the setup ran (None: no tmpfs)
    memory: int = 0  # the command's address-space limit in bytes (0: none)
    within: float = 0  # the most seconds the command may take (0: the battery's TIMEOUT)


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


def memory_limit(limit: int) -> Callable[[], None] | None:
    """A preexec_fn capping the child's address space at `limit` bytes (None for no cap): an allocation
    sized by a crafted file then fails at once instead of swapping the machine."""
    if not limit:
        return None
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def default_sigint() -> None:
    """A preexec_fn giving the child Ctrl-C's default action: a battery started in the background (`... &`
    from a script) ignores SIGINT, and a command that inherits SIG_IGN rightly keeps ignoring it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(ctx: Ctx, argv: list[str], cwd: Path, env: dict[str, str] | None = None,
            timeout: float = TIMEOUT, memory: int = 0) -> Result:
    """One mdlm-golf subprocess, output captured; a hang is killed and reported as exit None."""
    began = time.monotonic()
    try:
        p = subprocess.run(ctx.command + argv, cwd=cwd, env=env or ctx.env, capture_output=True,
                           timeout=timeout, stdin=subprocess.DEVNULL, preexec_fn=memory_limit(memory))
        code, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        code, out, err = None, e.stdout or b"", (e.stderr or b"") + b"\n[hostile: killed after timeout]"
    dec = lambda b: b.decode("utf-8", "replace")  # noqa: E731
    return Result(code, dec(out), dec(err), time.monotonic() - began)


def fill(text: str, places: dict[str, str]) -> str:
    for key, value in places.items():
        text = text.replace(key, value)
    return text


def shown(arg: str) -> str:
    """An argument as the report prints it: bytes that are not UTF-8 (a hostile --prompt) as \\x escapes."""
    return os.fsencode(arg).decode("utf-8", "backslashreplace")


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


# ---------------------------------------------------------------- inputs only some cases need (Ctx.built)

# a finished race and a finished ablation: the cases rerun these very commands (same flags, so the same
# configs) over a copy with one of its run's files damaged
FINISHED_RACE = ("race", "--recipes", "today", "--seeds", "1", "--data", "{D}", *TINY, "--steps", "2",
                 "--eval-num-seqs", "2", "--elbo-steps", "2")
FINISHED_ABLATION = ("ablate", "--param", "lr", "--values", "1e-3", "--seeds", "1", "--data", "{D}", *TINY,
                     "--steps", "2", "--eval-num-seqs", "2", "--elbo-steps", "2")
LONG_TEXT_BYTES = 30_000  # the long .mdz's text: some seconds to decode with the tiny model


def build_big(ctx: Ctx, path: Path) -> None:
    """A run folder whose model.pt is ~23M parameters (8 layers, width 512; the head drawn normal(0.02), so
    its weights do not compress to nothing): export, compress and eval spend long stretches in C on it."""
    cfg = build_config("tiny", environ={}, overrides=dict(num_layers=8, model_dim=512, num_heads=8, seq_len=256))
    torch.manual_seed(SEED)
    model = Transformer(cfg)
    torch.nn.init.normal_(model.head.weight, std=0.02)
    path.mkdir()
    save_checkpoint(path / "model.pt", model, cfg)


def build_with_cli(argv: tuple[str, ...]) -> Callable[[Ctx, Path], None]:
    """A builder that runs an mdlm-golf command writing `--out path`."""
    def build(ctx: Ctx, path: Path) -> None:
        places = ctx.places(path.parent)
        must(run_cli(ctx, [fill(a, places) for a in argv] + ["--out", str(path)], path.parent), argv[0])
    return build


def build_long_mdz(ctx: Ctx, path: Path) -> None:
    """A folder holding long.txt (the first LONG_TEXT_BYTES of the docs) and long.mdz, compressed by R."""
    path.mkdir()
    (path / "long.txt").write_bytes(ctx.path("docs.jsonl").read_bytes()[:LONG_TEXT_BYTES])
    must(run_cli(ctx, ["compress", "--run", str(ctx.path("R")), str(path / "long.txt"), str(path / "long.mdz")],
                 path), "compress (long)")


BUILDERS: dict[str, Callable[[Ctx, Path], None]] = {
    "big": build_big, "race": build_with_cli(FINISHED_RACE), "ablation": build_with_cli(FINISHED_ABLATION),
    "long": build_long_mdz}


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
    """Start a long command, signal it as its plan says, then check what it left (a train resumed from its
    checkpoint, a race or an ablation rerun). Plans, (kind, signal, ...):
      startup             0.4 s after the start, while the command imports
      once, twice, kill   a train, once R/metrics.jsonl has 3 lines (kill: 8, and a checkpoint); twice: two
                          signals 50 ms apart
      after, CPU, LATENCY once the command has spent CPU seconds (past its start-up, into its work); it must
                          end within LATENCY seconds of the signal (0: no bound)
      rerun               a race or an ablation, once WATCH/metrics.jsonl has 3 lines; then the same command
                          again, which must resume that run and finish"""
    kind, sig = case.signal_plan[:2]
    problems: list[str] = []
    out, err = open(c / "stdout.txt", "wb"), open(c / "stderr.txt", "wb")
    began = time.monotonic()
    proc = subprocess.Popen(ctx.command + argv, cwd=c, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                            preexec_fn=default_sigint)
    signalled = None
    try:
        if not wait_to_signal(proc, case, c / case.watch):
            problems.append(f"the command exited (code {proc.returncode}) or stalled before the signal")
        if proc.poll() is None:
            proc.send_signal(sig)
            signalled = time.monotonic()
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
    ended = time.monotonic()
    text = lambda name: (c / name).read_text("utf-8", "replace")  # noqa: E731
    res = Result(code, text("stdout.txt"), text("stderr.txt"), ended - began)
    latency = case.signal_plan[3] if kind == "after" else 0
    if latency and signalled is not None and ended - signalled > latency:
        problems.append(f"ended {ended - signalled:.1f} s after the signal, more than {latency} s")
    if kind in ("once", "kill") and not problems:
        problems += resume_after_signal(ctx, case, c, res, env)
        if kind == "kill":  # the case's verdict is the resume's
            res = Result(0 if not problems else 1, res.stdout, "", res.seconds)
    if kind == "rerun" and not problems:
        problems += rerun_after_signal(ctx, case, c, argv, env)
    return res, problems


def wait_to_signal(proc: subprocess.Popen, case: Case, run: Path) -> bool:
    """Wait for the moment the case's plan signals at; False if the command ended or stalled first."""
    kind = case.signal_plan[0]
    if kind == "startup":
        time.sleep(0.4)
        return True
    if kind == "after":
        began = time.monotonic()
        return wait_for(proc, lambda: cpu_seconds(proc.pid, began) >= case.signal_plan[2])
    need = 8 if kind == "kill" else 3
    return wait_for(proc, lambda: lines(run / "metrics.jsonl") >= need
                    and (kind != "kill" or (run / "checkpoint.pt").is_file()))


def cpu_seconds(pid: int, began: float) -> float:
    """The CPU seconds a process has spent (Linux /proc; elsewhere the wall seconds since `began`): on a
    machine busy with other work, CPU time says how far a command got better than the clock does."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return time.monotonic() - began
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime, in clock ticks


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
    run, kind = c / case.watch, case.signal_plan[0]
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


def rerun_after_signal(ctx: Ctx, case: Case, c: Path, argv: list[str], env: dict[str, str]) -> list[str]:
    """A race's or an ablation's run a signal stopped keeps its checkpoint and gets no summary; the same
    command again resumes that run ("resumed from" in its train.log) and finishes."""
    run = c / case.watch
    left = {"checkpoint.pt": True, SUMMARY_NAME: False}
    problems = [f"{case.watch}/{name} {'missing' if wanted else 'written'} after the signal"
                for name, wanted in left.items() if (run / name).is_file() != wanted]
    if problems:
        return problems
    again = run_cli(ctx, argv, c, env)
    if again.code != 0 or "Traceback" in again.stderr:
        return [f"the rerun exited {again.code}: {tail(again.stderr)}"]
    if "resumed from" not in (run / "train.log").read_text(errors="replace"):
        return [f"the rerun did not resume {case.watch} (no 'resumed from' in its train.log)"]
    return [] if (run / SUMMARY_NAME).is_file() else [f"the rerun finished without {case.watch}/{SUMMARY_NAME}"]


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
    if case.within and res.seconds > case.within:
        out.problems.append(f"took {res.seconds:.1f} s, more than {case.within:g} s")
    refused = res.code == 2 and case.expect in (REFUSE, EXACT, CLEAN)
    if case.expect == OK and res.code != 0:
        out.problems.append(f"exit {res.code}, expected 0")
    elif case.expect in (REFUSE,) and res.code != 2:
        out.problems.append(f"exit {res.code}, expected 2 (refuse)")
    elif case.expect == EXACT and res.code not in (0, 2):
        out.problems.append(f"exit {res.code}, expected 2 (refuse) or 0 with the original bytes")
    elif case.expect == CLEAN and res.code not in (0, 2):
        out.problems.append(f"exit {res.code}, expected 0 or 2")
    elif case.expect in SIGNALLED:
        judge_signalled(case, res.code, err_lines, last, places, out)
    if refused:
        judge_refusal(case, err_lines, last, places, out)
    if case.expect == EXACT and res.code == 0:
        produced = (c / case.output).read_bytes() if (c / case.output).is_file() else None
        if produced != ctx.path("text.txt").read_bytes():
            out.corruption_accepted = True
            out.problems.append("a corrupted .mdz decoded to different bytes with exit 0")
    elif case.corrupt and res.code == 0:
        out.corruption_accepted = True
        out.problems.append("corrupted input accepted (exit 0)")


def judge_refusal(case: Case, err_lines: list[str], last: str, places: dict[str, str], out: Outcome) -> None:
    """A refusal: one line `mdlm-golf CMD: error: ...` naming what is wrong."""
    if not ERROR_LINE.match(last):
        out.problems.append(f"last stderr line is not `mdlm-golf CMD: error: ...`: {last!r}")
    elif len(err_lines) != 1 and not case.preamble:
        out.problems.append(f"{len(err_lines)} lines on stderr, expected one")
    judge_names(case, last, places, out)


def judge_signalled(case: Case, code: int, err_lines: list[str], last: str, places: dict[str, str],
                    out: Outcome) -> None:
    """A signalled command: its exit status and its one line (the last one, after a `preamble`)."""
    status, line, said = SIGNALLED[case.expect]
    if code != status or not line.match(last):
        out.problems.append(f"exit {code} / last line {last!r}, expected {status} and {said}")
    elif len(err_lines) != 1 and not case.preamble:
        out.problems.append(f"{len(err_lines)} lines on stderr, expected one")
    judge_names(case, last, places, out)


def judge_names(case: Case, last: str, places: dict[str, str], out: Outcome) -> None:
    """The line must contain each of the case's `names` (the file or field at fault, or the reason)."""
    wanted = (case.names,) if isinstance(case.names, str) else case.names
    for name in filter(None, (fill(n, places) for n in wanted)):
        if name not in last:
            out.named = False
            out.problems.append(f"the line does not name {name!r}")


def case_dir(ctx: Ctx, index: int) -> Path:
    return ctx.work / "cases" / f"{index:03d}"


def run_case(ctx: Ctx, case: Case, index: int) -> Outcome:
    """Run a case in its own folder (on its own small disk, for full-disk cases), or say why it is skipped."""
    c = case_dir(ctx, index)
    c.mkdir(parents=True)
    argv = [fill(a, ctx.places(c)) for a in case.argv]
    out = Outcome(case.category, case.name, case.expect, " ".join(map(shown, ["mdlm-golf", *argv])))
    if case.nonroot and ctx.root:
        out.skipped = AS_ROOT
        return out
    with case_disk(c / DISK, case.disk_free is not None) as unavailable:
        if unavailable:
            out.skipped = unavailable
        else:
            run_and_judge(ctx, case, c, argv, out)
    return out


def run_and_judge(ctx: Ctx, case: Case, c: Path, argv: list[str], out: Outcome) -> None:
    """Set the case up, run it, judge it, and check nothing existing was lost."""
    places = ctx.places(c)
    env = {**ctx.env, **{k: fill(v, places) for k, v in case.env}}
    if case.setup:
        case.setup(ctx, c)
        fill_literal_placeholders(c, places)
    if case.disk_free is not None:
        fill_disk(c / DISK, case.disk_free)
    base_before, before = snapshot(ctx.base), snapshot(c)
    if case.runner == "signal":
        res, extra = run_signal(ctx, case, c, argv, env)
    elif case.runner == "roundtrip":
        res, extra = run_roundtrip(ctx, case, c, env)
        out.argv = f"mdlm-golf compress/decompress {' '.join(map(shown, argv))} [{case.name}]"
    else:
        res, extra = run_cli(ctx, argv, c, env, memory=case.memory), []
    out.exit, out.seconds, out.stderr_tail = res.code, round(res.seconds, 2), tail(res.stderr, 4)
    judge(ctx, case, c, res, out)
    out.problems += extra
    if case.check and not out.problems:  # further checks once the command did what was expected
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


# ---------------------------------------------------------------- full-disk cases: a small tmpfs per case

@contextmanager
def case_disk(mount: Path, wanted: bool) -> Iterator[str]:
    """A DISK_SIZE tmpfs mounted at `mount` for the block, unmounted after it; yields '' (mounted, or not
    wanted) or why it could not be mounted (mounting needs root on Linux): the case is then skipped."""
    if not wanted:
        yield ""
        return
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE}", "tmpfs", str(mount)],
                              capture_output=True, text=True)
        reason = tail(done.stderr, 1) if done.returncode else ""
    except OSError as e:  # no mount command
        reason = str(e)
    if reason:
        yield f"cannot mount a tmpfs for a full disk ({reason}): needs root on Linux"
        return
    try:
        yield ""
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)  # busy: detach it now, free later


def fill_disk(mount: Path, free: int) -> None:
    """Fill the tmpfs with one file, then give `free` bytes back: the command finds that much room (to a
    page) and no more."""
    filler = mount / FILLER
    with open(filler, "wb", buffering=0) as f:
        chunk = bytes(1 << 16)
        try:
            while f.write(chunk):
                pass
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
    os.truncate(filler, max(0, filler.stat().st_size - free))


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
