"""The flow's summary: test metrics against the majority baseline, as a Prefect markdown artifact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tilepipe.redaction import redact

ARTIFACT_KEY = "tilepipe-metrics"
ROWS = (("accuracy", "accuracy"), ("macro-F1", "macro_f1"), ("mIoU", "miou"))


def metrics_markdown(metrics: dict[str, Any], run: dict[str, Any], registered: dict[str, Any]) -> str:
    """Markdown table of the test metrics beside the baseline, with the MLflow run and model version."""
    lines = [
        "# tilepipe: test metrics",
        "",
        f"{metrics['test_scenes']} held-out test scene(s), {metrics['test_tiles']} tiles.",
        "",
        "| metric | model | majority baseline |",
        "|---|---:|---:|",
        *(f"| {name} | {metrics[key]:.4f} | {metrics[f'baseline_{key}']:.4f} |" for name, key in ROWS),
        "",
        f"MLflow run `{run['run_id']}` (experiment {run['experiment_id']}, {redact(run['tracking_uri'])}).",
        f"Registered as **{registered['name']} v{registered['version']}**: {registered['decision']}"
        + (" (now `champion`)." if registered["champion"] else "."),
    ]
    return "\n".join(lines) + "\n"


@task(name="publish-metrics", cache_policy=NO_CACHE)
def publish_metrics(model_dir: Path, metrics_dir: Path, registered: dict[str, Any]) -> dict[str, Any]:
    """Publish the metrics artifact (key ``tilepipe-metrics``); return the headline numbers."""
    metrics = json.loads((metrics_dir / "metrics.json").read_text())
    run = json.loads((model_dir / "run.json").read_text())
    create_markdown_artifact(
        key=ARTIFACT_KEY, markdown=metrics_markdown(metrics, run, registered), description="test metrics"
    )
    keys = [k for _, k in ROWS] + [f"baseline_{k}" for _, k in ROWS]
    return {**{k: metrics[k] for k in keys}, "run_id": run["run_id"], "model_version": registered["version"]}
