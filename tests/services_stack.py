"""The stack of `tilepipe services up` for the tests: started once per session (per xdist worker).

A pytest plugin (conftest.py's ``pytest_plugins``): a test that asks for ``services`` gets the
running :class:`tilepipe.services.stack.Stack` (PostgreSQL, S3, MLflow and Prefect servers on
127.0.0.1); mark such tests ``@pytest.mark.xdist_group("services")`` so that they share one
worker and one stack. The same code as the command starts it, in a temporary folder, and stops it
at the end of the session: every recorded process must be gone then.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tilepipe.services import stack as services_stack
from tilepipe.services.procs import alive


@pytest.fixture(scope="session", name="services")
def services_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services_stack.Stack]:
    """Start the stack in a temporary folder; stop it (and check that it stopped) after the session."""
    home = tmp_path_factory.mktemp("services")
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
