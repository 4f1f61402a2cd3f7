"""Where the MLflow tracking store is: ``MLFLOW_TRACKING_URI``, else a SQLite file in the project."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite store in the project directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def connected_mlflow() -> Any:
    """The ``mlflow`` module, pointed at :func:`tracking_uri` (imported here: it is slow to import)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow
