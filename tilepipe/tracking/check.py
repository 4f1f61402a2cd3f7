"""Fail fast on a tracking store that cannot be used, before any training starts.

Two faults are common: an HTTP tracking server that is down (MLflow would retry for minutes,
``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` = 7 with backoff, 120 s timeout per request) and a SQLite
store locked by another process (MLflow waits 20 s per statement, then fails in the middle of
a run). The first calls to the store run under :func:`fail_fast`: the SQLite file is probed for a
write lock with a short busy timeout, HTTP requests get no retries and a short timeout, and any
failure becomes one line naming the URI and the cause.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from tilepipe.errors import TilepipeError
from tilepipe.processes import environment
from tilepipe.redaction import redact, redact_text

SQLITE_BUSY_S = 3.0  # how long the probe waits for another process's lock on the SQLite store
HTTP_PROBE_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
CAUSES = {
    "Connection refused": "connection refused: no server listens there",
    "Failed to resolve": "host name not found",
    "Name or service not known": "host name not found",
    "timed out": f"no answer within {HTTP_PROBE_ENV['MLFLOW_HTTP_REQUEST_TIMEOUT']} s",
    "database is locked": "database is locked by another process",
}


def unusable(uri: str, cause: str) -> TilepipeError:
    """The one-line error for a tracking store that cannot be used."""
    return TilepipeError(
        f"MLflow tracking store {redact(uri)} is unusable ({cause}); training was not started. "
        "Fix MLFLOW_TRACKING_URI, start the server or stop the process holding the database, then rerun."
    )


def short_cause(exc: BaseException) -> str:
    """A short, one-line description of why a call to the store failed."""
    text = redact_text(" ".join(str(exc).split())) or type(exc).__name__
    for needle, cause in CAUSES.items():
        if needle in text:
            return cause
    return text if len(text) <= 200 else text[:197] + "..."


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:`` URI (None for an in-memory or another store)."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    return Path(database) if database and database != ":memory:" else None


def probe_sqlite(uri: str, busy_s: float = SQLITE_BUSY_S) -> None:
    """Take and drop a write lock on the SQLite store, waiting at most ``busy_s`` seconds."""
    path = sqlite_path(uri)
    if path is None or not path.is_file():
        return  # a new store: nobody can hold a lock on it, MLflow creates it
    try:
        con = sqlite3.connect(
            f"file:{quote(str(path))}?mode=rw", uri=True, timeout=busy_s, isolation_level=None
        )
        try:
            con.execute("BEGIN IMMEDIATE")
            con.execute("ROLLBACK")
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise unusable(uri, short_cause(exc)) from None


UNREACHABLE = ("Max retries exceeded", "Connection refused", "ConnectionError", "Connection aborted",
               "Read timed out", "RemoteDisconnected", "Failed to establish a new connection")  # fmt: skip


def is_unreachable(exc: BaseException) -> bool:
    """True if a call to the store failed because the server stopped answering (after MLflow's retries)."""
    text = f"{type(exc).__name__}: {exc}"
    return any(needle in text for needle in UNREACHABLE)


def lost(uri: str, exc: BaseException, model_dir: Path | None) -> TilepipeError:
    """The one-line error for a tracking server that went away during training."""
    retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    kept = f"; the model trained so far stays in {model_dir}" if model_dir is not None else ""
    return TilepipeError(
        f"MLflow tracking server {redact(uri)} stopped answering during training ({short_cause(exc)}; "
        f"gave up after {retries} retries, MLFLOW_HTTP_REQUEST_MAX_RETRIES){kept}. "
        "Start the server again and rerun (train.resume continues from the last checkpoint)."
    )


def quick_http():
    """HTTP calls to the store without retries and with a short timeout (for a server already gone)."""
    return environment(HTTP_PROBE_ENV)


@contextmanager
def fail_fast(uri: str) -> Iterator[None]:
    """Run the first calls to the store bounded in time; any failure is one :class:`TilepipeError`."""
    probe_sqlite(uri)
    with quick_http():
        try:
            yield
        except TilepipeError:
            raise
        except Exception as exc:  # noqa: BLE001 - any store failure here means tracking is unusable
            raise unusable(uri, short_cause(exc)) from None
