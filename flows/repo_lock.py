"""One pipeline run per repository: the flow holds DVC's own repo lock, the one `dvc repro` takes.

DVC locks a project with ``zc.lockfile`` on ``.dvc/tmp/lock`` (an ``flock``, so a killed holder
never leaves a stale lock; see dvc/lock.py) for the whole of ``dvc repro``. ``tilepipe flow`` takes
the same lock for its whole run, so a second run, of either kind, fails at once instead of writing
the same outputs. The flow's own ``dvc status`` / ``dvc commit`` take that lock themselves, so it
is lent to them (:func:`lent`) and taken back after; if another run grabs it meanwhile, the flow
stops with the same clear error. Outside a DVC project there is no lock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import zc.lockfile

from tilepipe.errors import TilepipeError

LOCK_FILE = Path(".dvc/tmp/lock")  # dvc.repo.Repo: make_lock(os.path.join(tmp_dir, "lock"))


class _Held:
    """The hold of this process on the lock: reentrant, shared by the flow's threads."""

    def __init__(self) -> None:
        self.mutex = threading.RLock()
        self.depth = 0
        self.lock: zc.lockfile.LockFile | None = None
        self.path: Path | None = None


_HELD = _Held()


def is_dvc_project(root: Path) -> bool:
    """True when ``root`` is a DVC project with a pipeline."""
    return (root / ".dvc").is_dir() and (root / "dvc.yaml").is_file()


def _acquire(path: Path) -> zc.lockfile.LockFile:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return zc.lockfile.LockFile(str(path))
    except zc.lockfile.LockError:
        try:
            holder = f"process {path.read_text().strip()}"
        except OSError:
            holder = "another process"
        raise TilepipeError(
            f"another pipeline run holds the lock on {path.parents[2]}: {path} is held by {holder} "
            "(dvc repro, dvc exp run or tilepipe flow); wait for it to finish, then rerun"
        ) from None


@contextmanager
def pipeline_lock(root: Path | str = ".") -> Iterator[None]:
    """Hold the repository's lock while the block runs; fail at once if another run holds it."""
    root = Path(root).resolve()
    if not is_dvc_project(root):
        yield
        return
    with _HELD.mutex:
        if _HELD.depth == 0:
            _HELD.path = root / LOCK_FILE
            _HELD.lock = _acquire(_HELD.path)
        _HELD.depth += 1
    try:
        yield
    finally:
        with _HELD.mutex:
            _HELD.depth -= 1
            if _HELD.depth == 0 and _HELD.lock is not None:
                _HELD.lock.close()
                _HELD.lock = None


@contextmanager
def lent() -> Iterator[None]:
    """Release a held lock while our own dvc command runs (it locks the repo itself); retake it after."""
    with _HELD.mutex:
        held, path = _HELD.lock, _HELD.path
        if held is not None:
            held.close()
            _HELD.lock = None
    try:
        yield
    finally:
        if held is not None and path is not None:
            with _HELD.mutex:
                if _HELD.depth > 0 and _HELD.lock is None:
                    _HELD.lock = _acquire(path)
