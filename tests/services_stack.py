"""The stack of `tilepipe services up` for the tests: started once per session (per xdist worker).

A pytest plugin (conftest.py's ``pytest_plugins``): a test that asks for ``services`` gets the
running :class:`tilepipe.services.stack.Stack` (PostgreSQL, S3, MLflow and Prefect servers on
127.0.0.1, each behind the stack's credentials); mark such tests
``@pytest.mark.xdist_group("services")`` so that they share one worker and one stack. The same
code as the command starts it, in a temporary folder, and stops it at the end of the session:
every recorded process must be gone then, and no folder around the project, the venv or the
stack may have changed its permissions (``folder_modes``, taken before ``up``).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tilepipe.processes import environment
from tilepipe.services import postgres
from tilepipe.services import stack as services_stack
from tilepipe.services.procs import alive

ROOT = Path(__file__).resolve().parents[1]
BEFORE_UP: dict[str, tuple[int, int, int]] = {}  # folder -> (mode, uid, gid), taken before `up`


def watched_folders(home: Path) -> list[Path]:
    """Every parent of the project, the venv, the stack's folder and PostgreSQL's, and those folders."""
    pginstall = postgres.installed_bindir().parent
    starts = [ROOT, Path(sys.prefix), home, pginstall, pginstall / "bin", pginstall / "lib",
              postgres.data_dir(home).parent]  # fmt: skip
    found = set()
    for start in starts:
        found.update(p for p in [start, *start.parents] if p.is_dir())
    return sorted(found)


def folder_modes(home: Path) -> dict[str, tuple[int, int, int]]:
    """Mode, owner and group of every watched folder."""
    return {str(p): (p.stat().st_mode, p.stat().st_uid, p.stat().st_gid) for p in watched_folders(home)}


def changed_folders(before: dict, after: dict) -> list[str]:
    """The folders whose mode, owner or group differ (a folder made since is not a change)."""
    return [
        f"{p}: {oct(before[p][0])} -> {oct(after[p][0])}"
        for p in before
        if p in after and before[p] != after[p]
    ]


def command_env(stack: services_stack.Stack, **extra: str) -> dict[str, str]:
    """The environment of a command run on the stack: no proxy, its variables and credentials, ``extra``."""
    from tilepipe.services.parts import base_env

    return {**base_env(), **stack.env, **extra}


@contextmanager
def stack_env(stack: services_stack.Stack) -> Iterator[dict[str, str]]:
    """This process's environment pointed at the stack, credentials included, restored after."""
    with environment(stack.env):
        yield stack.env


@pytest.fixture(scope="session", name="services")
def services_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services_stack.Stack]:
    """Start the stack in a temporary folder; stop it (and check that it stopped) after the session."""
    home = tmp_path_factory.mktemp("services")
    BEFORE_UP.update(folder_modes(home))
    try:
        stack, started = services_stack.up(home)
        assert started == list(services_stack.ORDER)
        yield stack
    finally:
        recorded = services_stack.load(home)
        services_stack.down(home)
        if recorded is not None:
            left = [name for name, proc in recorded.procs.items() if alive(proc)]
            assert not left, f"still running after down: {left}"
        data = postgres.data_dir(home)
        if not data.is_relative_to(home):  # as root: the data folder made for the stack's PostgreSQL
            shutil.rmtree(data, ignore_errors=True)
        changed = changed_folders(BEFORE_UP, folder_modes(home))
        assert not changed, f"folder permissions changed by services up/down: {changed}"
