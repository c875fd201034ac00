"""Atomic file writes: write a temporary file beside the target, then rename over it.

A crash or a full disk mid-write leaves the previous file intact and no temporary file behind;
a temporary left by a killed writer (SIGKILL, power loss) is removed by the next write of that file.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator


def temp_prefix(path: Path) -> str:
    """Temporaries of `path` are named this prefix + the writer's pid (hidden, beside the target)."""
    return f".{path.name}.tmp"


def process_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this machine (signal 0 checks without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process, or not a pid: leave its file alone
        return True
    return True


def remove_stale_temps(path: Path) -> None:
    """Delete temporaries of `path` whose writer no longer runs: it was killed mid-write."""
    prefix = temp_prefix(path)
    try:
        names = [e.name for e in os.scandir(path.parent) if e.name.startswith(prefix)]
    except OSError:  # no folder yet: the write itself reports it
        return
    for name in names:
        pid = name[len(prefix):]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            with suppress(OSError):  # a leftover we may not delete must not stop this write
                (path.parent / name).unlink(missing_ok=True)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path`, on failure it is removed."""
    path = Path(path)
    remove_stale_temps(path)
    tmp = path.with_name(f"{temp_prefix(path)}{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename is None and e.errno is not None:  # a full disk names no file: name the target
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def read_json_object(path: Path, error: type[Exception], what: str = "JSON") -> dict | None:
    """The JSON object in `path`, or None where there is no such file; anything else is `error`, one line."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not {what} ({e})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: not a JSON object")
    return value
