"""A real Prefect API for the flow tests: one `prefect server start` per test session (per xdist worker).

A pytest plugin (conftest.py's ``pytest_plugins``): a test that asks for the ``prefect_api``
fixture gets the server; mark such tests ``@pytest.mark.xdist_group("prefect")`` so that
``pytest -n 2 --dist loadgroup`` runs them on one worker, against one server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

BIN = Path(sys.executable).parent
START_TIMEOUT = 120.0  # seconds; the server is slow to start on 2 busy cores


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(home: Path) -> dict[str, str]:
    """Environment of the server: its own PREFECT_HOME and SQLite database, no analytics, no UI."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_LOGGING_LEVEL="WARNING",
    )
    return env


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = START_TIMEOUT) -> None:
    """Poll ``/health`` until it answers; fail with the server log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"prefect server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"prefect server did not answer {url}/health in {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def drain_clients() -> None:
    """Send the logs and events still queued in this process before the server goes away."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=10)


def stop(proc: subprocess.Popen, wait_s: float = 20) -> None:
    """Terminate a process group (a server, a worker and what it runs), then kill it if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)


@pytest.fixture(scope="session", name="prefect_api")
def prefect_api_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start a Prefect server on a free port; PREFECT_API_URL points at it (env and settings)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    home = tmp_path_factory.mktemp("prefect-server")
    client_home = tmp_path_factory.mktemp("prefect-client")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    log = home / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=server_env(home),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so stop() reaches its children too
        )
    saved = {
        k: os.environ.get(k) for k in ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED")
    }
    try:
        wait_healthy(url, proc, log)
        os.environ.update(
            PREFECT_API_URL=url, PREFECT_HOME=str(client_home), PREFECT_SERVER_ANALYTICS_ENABLED="false"
        )
        with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_HOME: str(client_home)}):
            yield url
    finally:
        drain_clients()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        stop(proc)
