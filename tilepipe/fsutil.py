"""Atomic file output: write to a temp path beside the target, fsync, then rename."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

TEMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp / mkdtemp create private (0600 / 0700) entries; outputs get the usual umask-based modes.
FILE_MODE, DIR_MODE = 0o666 & ~_umask(), 0o777 & ~_umask()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(target: Path | str, mode: int | None = None) -> Iterator[Path]:
    """Yield a temp path to write; on success it is fsynced and renamed onto ``target``.

    ``mode``: the file's permissions (default: the umask's); the temp file is 0600 until then.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, FILE_MODE if mode is None else mode)
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text(target: Path | str, text: str, mode: int | None = None) -> None:
    """Atomically write a text file (``mode``: its permissions, e.g. 0o600 for a secret)."""
    with atomic_path(target, mode) as tmp:
        tmp.write_text(text)


def write_json(target: Path | str, obj: Any, compact: bool = False) -> None:
    """Atomically write JSON: pretty, or ``compact`` for big machine-read files.

    Compact JSON goes through orjson: ~10x the speed of ``json``'s C encoder (a 16384 px scene's
    tile index: 0.3 s -> 0.03 s), the same values (floats round-trip exactly).
    """
    if compact:
        text = orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY).decode()
    else:
        text = json.dumps(obj, indent=1)
    write_text(target, text + "\n")


@contextmanager
def atomic_dir(target: Path | str) -> Iterator[Path]:
    """Yield a temp directory; on success it replaces ``target`` whole."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, DIR_MODE)
        old = target.with_name(f".{target.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_leftover(path: Path) -> bool:
    """True for what a killed atomic write leaves behind: ``.<name>.*.tmp`` or ``.<name>.old``."""
    name = path.name
    return name.startswith(".") and (name.endswith(TEMP_SUFFIX) or name.endswith(".old"))


def remove_leftovers(folder: Path | str) -> list[Path]:
    """Delete the temp files and folders a killed writer left in ``folder``; returns them."""
    folder = Path(folder)
    found = [p for p in folder.iterdir() if is_leftover(p)] if folder.is_dir() else []
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found


def input_problem(path: Path | str, missing: str = "file not found") -> str | None:
    """Why ``path`` cannot be opened as an input file (``missing`` when it does not exist), or None."""
    path = Path(path)
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python < 3.13 reports a symlink loop this way
        return "symlink loop: the link leads back to itself"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink loop: the link leads back to itself"
        if path.is_symlink():
            return f"broken symlink: it points to {os.readlink(path)}, which does not exist"
        return missing
    if path.is_dir():
        return "is a directory, not a file"
    return None


def file_sha256(path: Path | str) -> str:
    """SHA-256 of a file's content, read in chunks."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def relative_to_cwd(path: Path) -> str:
    """A path relative to the working directory when inside it, else absolute (POSIX form)."""
    path = Path(os.path.abspath(path))
    try:
        return path.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return path.as_posix()
