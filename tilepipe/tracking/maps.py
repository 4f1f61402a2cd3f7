"""A mapping run in MLflow: a run of kind ``map`` in the model's experiment, when a store is configured.

Its tags name the model (name, version, run, SHA-256), the catalog and the output; its metrics are
the scene counts, the megapixels and their rate, and the hectares of each class over every scene of
the run that has a map; ``summary.csv`` and ``collection.json`` are its artifacts (``map/``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tilepipe.errors import TilepipeError
from tilepipe.tracking.check import probe_sqlite, quick_http, short_cause
from tilepipe.tracking.store import connected_mlflow, tracking_uri


def store_configured() -> bool:
    """True when ``MLFLOW_TRACKING_URI`` is set or the project's default store (``mlflow.db``) exists."""
    return bool(os.environ.get("MLFLOW_TRACKING_URI")) or (Path.cwd() / "mlflow.db").is_file()


def map_metrics(rows: list[dict[str, Any]], classes: list[str], seconds: float) -> dict[str, float]:
    """Scene counts, megapixels mapped and per second, hectares per class over the scenes with a map."""
    mapped = [r for r in rows if r["status"] == "mapped"]
    megapixels = sum(float(r.get("megapixels") or 0) for r in mapped)
    metrics = {
        f"scenes_{s}": float(sum(r["status"] == s for r in rows)) for s in ("mapped", "current", "failed")
    }
    metrics.update(scenes=float(len(rows)), megapixels_mapped=megapixels, seconds=seconds,
                   megapixels_per_second=megapixels / max(seconds, 1e-9))  # fmt: skip
    for name in classes:
        areas = [
            r.get("class_area_ha", {}).get(name) or 0.0 for r in rows if r["status"] in ("mapped", "current")
        ]
        metrics[f"area_ha_{name}"] = float(sum(areas))
    return metrics


def log_map_run(
    fallback_experiment: str,
    model: dict[str, Any],
    tags: dict[str, str],
    metrics: dict[str, float],
    texts: dict[str, str],
) -> str:
    """Log one ``map`` run in the experiment of the model's training run (else ``fallback_experiment``).

    A store that cannot be used is one line; the maps are written either way.
    """
    uri = tracking_uri()
    try:
        probe_sqlite(uri)
        mlflow = connected_mlflow()
        with quick_http():
            experiment_id = None
            if model.get("run_id"):
                experiment_id = mlflow.get_run(model["run_id"]).info.experiment_id
            if experiment_id is None:
                experiment_id = mlflow.set_experiment(fallback_experiment).experiment_id
            run = mlflow.start_run(experiment_id=experiment_id, run_name=tags.get("run_name", "map"))
    except Exception as exc:  # noqa: BLE001 - any store failure here: the run is not logged, said in one line
        cause = str(exc) if isinstance(exc, TilepipeError) else short_cause(exc)
        raise TilepipeError(f"MLflow tracking store {uri}: the map run was not logged ({cause})") from None
    try:
        identity = {f"model_{k}": str(v) for k, v in model.items() if v not in (None, "")}
        mlflow.set_tags({"kind": "map", **identity, **tags})
        mlflow.log_metrics(metrics)
        for name, text in texts.items():
            mlflow.log_text(text, f"map/{name}")
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run()
    return run.info.run_id
