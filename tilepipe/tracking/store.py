"""Where the MLflow tracking store is: ``MLFLOW_TRACKING_URI``, else a SQLite file in the project."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tilepipe.redaction import redact


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite store in the project directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def connected_mlflow() -> Any:
    """The ``mlflow`` module, pointed at :func:`tracking_uri` (imported here: it is slow to import)."""
    import mlflow

    uri = tracking_uri()
    no_login_in_links(uri)
    mlflow.set_tracking_uri(uri)
    return mlflow


def no_login_in_links(uri: str) -> None:
    """Stop MLflow printing "View run <URI>/#/..." when the URI holds a login (``https://user:token@``)."""
    if redact(uri) != uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
