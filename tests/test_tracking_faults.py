"""A tracking store or Prefect API that cannot be used stops the run before any work, with one line."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import ROOT, TRAIN, tiny_overrides
from tilepipe.errors import TilepipeError
from tilepipe.tracking.check import SQLITE_BUSY_S, fail_fast, probe_sqlite

TILEPIPE = str(Path(sys.executable).parent / "tilepipe")
PROCESS_BOUND_S = 180  # process start (torch, mlflow imports) on a busy 2-core machine + the probe;
# unbounded, MLflow retries a refused connection 7 times with backoff (about 4 minutes)
PROBE_BOUND_S = 15  # the probe alone, measured in this process


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def _train(tmp_path: Path, uri: str) -> tuple[subprocess.CompletedProcess[str], float]:
    sets = [x for o in [*tiny_overrides(tmp_path), *TRAIN] for x in ("--set", o)]
    cmd = [TILEPIPE, "train", "--params", str(ROOT / "params.yaml"), *sets]
    cmd += ["--tiles", str(tmp_path / "tiles"), "--split", str(tmp_path / "split.json")]
    cmd += ["--out", str(tmp_path / "models")]
    started = time.monotonic()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    return result, time.monotonic() - started


def _assert_failed_before_training(tmp_path: Path, result, seconds: float, *needles: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tilepipe train: error: MLflow tracking store "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "training was not started" in lines[0]
    assert "epoch" not in result.stdout
    assert not (tmp_path / "models").exists(), "no partial output"
    assert seconds < PROCESS_BOUND_S, f"took {seconds:.0f} s"


def test_unreachable_tracking_server_fails_fast(prepared):  # noqa: F811
    tmp_path, _ = prepared
    uri = f"http://127.0.0.1:{_closed_port()}"
    result, seconds = _train(tmp_path, uri)
    _assert_failed_before_training(tmp_path, result, seconds, uri, "connection refused")
    before, started = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES"), time.monotonic()
    with pytest.raises(TilepipeError, match="connection refused"), fail_fast(uri):
        MlflowClient(tracking_uri=uri).get_experiment_by_name("tilepipe")
    assert time.monotonic() - started < PROBE_BOUND_S
    assert os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES") == before, "the probe's settings are restored"


def test_locked_sqlite_store_fails_fast(prepared):  # noqa: F811
    tmp_path, _ = prepared
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    holder = sqlite3.connect(db, isolation_level=None)  # another process's view: the CLI runs apart
    try:
        holder.execute("CREATE TABLE held (x INTEGER)")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("INSERT INTO held VALUES (1)")
        result, seconds = _train(tmp_path, uri)
        started = time.monotonic()
        with pytest.raises(TilepipeError, match="database is locked"):
            probe_sqlite(uri)
        assert SQLITE_BUSY_S - 0.5 < time.monotonic() - started < PROBE_BOUND_S
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    _assert_failed_before_training(tmp_path, result, seconds, uri, "database is locked")
    probe_sqlite(uri)  # released: the same probe now passes


def test_unreachable_prefect_api_is_one_clear_line(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/api"
    env = {**os.environ, "PREFECT_API_URL": url}
    sets = [x for o in tiny_overrides(tmp_path) for x in ("--set", o)]
    cmd = [TILEPIPE, "flow", "--params", str(ROOT / "params.yaml"), *sets]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"tilepipe flow: error: Prefect API {url} does not answer"), lines[0]
    assert not (tmp_path / "data").exists()
