"""Child processes: how many cores there are, and ending a child when its parent ends."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

PR_SET_PDEATHSIG = 1  # prctl(2): signal this process when its parent ends


def cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def die_with_parent(parent: int | None = None, sig: int = signal.SIGKILL) -> None:
    """In a child: the kernel sends ``sig`` when the parent ends (Linux), so no worker outlives a kill.

    ``parent`` is the pid the child expects as its parent; without it, a parent already replaced
    by init (pid 1) counts as gone. Either way a child whose parent died before prctl took effect
    exits at once.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
        except (OSError, AttributeError):
            pass
    gone = os.getppid() != parent if parent is not None else os.getppid() == 1
    if gone:
        os._exit(1)


@contextmanager
def environment(values: dict[str, str], keep_set: bool = False) -> Iterator[None]:
    """Set environment variables for the block, then restore them (``keep_set``: leave set ones alone)."""
    saved = {name: os.environ.get(name) for name in values}
    for name, value in values.items():
        if not (keep_set and name in os.environ):
            os.environ[name] = value
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
