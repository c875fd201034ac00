"""Atomic file writes: write a temporary file beside the target, then rename over it.

A crash or a full disk mid-write leaves the previous file intact and no temporary file behind;
a temporary left by a killed writer (SIGKILL, power loss) is removed by the next write of that file.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
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
            leftover = path.parent / name
            with suppress(OSError):  # a leftover we may not delete must not stop this write
                if leftover.is_dir():  # an atomic_folder's
                    shutil.rmtree(leftover)
                else:
                    leftover.unlink(missing_ok=True)


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


@contextmanager
def atomic_folder(path: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it becomes `path` (replacing a folder that holds files
    only when `replace`), on failure it is removed, so `path` is never left half written."""
    path = Path(path)
    if path.is_dir() and any(path.iterdir()) and not replace:
        raise FileExistsError(errno.EEXIST, "holds files; pass --overwrite to replace it", str(path))
    remove_stale_temps(path)
    tmp = path.with_name(f"{temp_prefix(path)}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.is_dir() and any(path.iterdir()):  # replace: the old folder goes only once the new one is whole
            old = path.with_name(f"{temp_prefix(path)}{os.getpid()}.old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.filename is None and e.errno is not None:  # a full disk names no file: name the folder
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def hidden_temp_folder(folder: Path, name: str) -> Path:
    """A new empty hidden folder inside `folder`, named for `name` and this process (as temporaries are),
    after removing those of the same name whose writer was killed."""
    remove_stale_temps(folder / name)
    tmp = folder / f"{temp_prefix(folder / name)}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


@contextmanager
def staged_folder(folder: Path) -> Iterator[Path]:
    """Yield an empty hidden temporary folder inside `folder` (one filesystem even where `folder` is a
    mount point: moving out of it is a rename) in which to write a new version of some of `folder`'s
    files; it is removed afterwards whatever happens. An error naming a file inside it names that file in
    `folder` instead, where the user looks."""
    folder = Path(folder)
    tmp = hidden_temp_folder(folder, "staged")
    try:
        yield tmp
    except OSError as e:
        named = Path(e.filename) if e.filename is not None else tmp
        if named == tmp or tmp in named.parents:
            raise OSError(e.errno, e.strerror, str(folder / named.relative_to(tmp))) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_output(path: Path, overwrite: bool, reads: list[Path] = ()) -> None:
    """Refuse to write `path` when it is a file this command reads (never, even with overwrite) or an
    existing file (unless overwrite): nothing already written is replaced without being asked."""
    path = Path(path)
    target = path.resolve()
    for source in reads:
        if Path(source).resolve() == target:
            raise FileExistsError(errno.EEXIST, "is a file this command reads; write to another path",
                                  str(path))
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder; name a file to write", str(path))
    if path.exists() and not overwrite:
        raise FileExistsError(errno.EEXIST, "exists; pass --overwrite to replace it", str(path))


def write_png(fig, path: Path, dpi: int) -> None:
    """A matplotlib figure, laid out tight, to a PNG file written atomically."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


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
