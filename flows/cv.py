"""Scene-grouped cross-validation as a Prefect flow: a plan task, one task per fold, a report task.

Each fold task starts and awaits its own child process (tilepipe/study/runner.launch, as the
study's trainings), so ``study.threads`` holds per fold while ``study.parallel`` run at once.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tilepipe import wiring
from tilepipe.flows.fanout import run_each
from tilepipe.flows.settings import prefect_settings
from tilepipe.params import Params, load_params
from tilepipe.study.cv import cv_parent_run, cv_table, finish_cv, plan_cv, require_inputs
from tilepipe.study.runner import launch, parallelism, study_lock

SCENES, TILES, OUT, METRICS = str(wiring.SCENES), str(wiring.TILES), str(wiring.CV), str(wiring.CV_METRICS)
ARTIFACT_KEY = "tilepipe-cv"
step = partial(task, cache_policy=NO_CACHE)


@step(name="cv-plan")
def plan_task(params: Params, scenes_json: Path, tiles: Path, out: Path) -> dict[str, Any]:
    """Assign every labelled scene to one fold's test and write each fold's split."""
    return plan_cv(params, scenes_json, tiles, out)


@step(name="cv-train")
def train_task(
    params: Params, training: dict[str, Any], tiles: Path, folds_json: Path, parent_run_id: str
) -> dict[str, Any]:
    """One fold in its own process (a child MLflow run), scored on the fold's test scenes."""
    row = launch(params, training, tiles, folds_json, parent_run_id)
    get_run_logger().info("%s: held-out %.3f", row["name"], row["heldout"])
    return row


@step(name="cv-report")
def report_task(plan: dict[str, Any], rows: list[dict[str, Any]], cv_json: Path, parent_run_id: str) -> dict:
    """Write cv.json, log it to the parent run, publish the table as an artifact."""
    doc = finish_cv(plan, rows, cv_json, parent_run_id)
    create_markdown_artifact(
        key=ARTIFACT_KEY,
        markdown=f"# tilepipe cross-validation\n\n```\n{cv_table(doc)}\n```\n\n"
        f"MLflow parent run `{parent_run_id}`; `{cv_json}`.\n",
        description="held-out scores of scene-grouped folds",
    )
    return doc


@flow(name="tilepipe-cv", log_prints=True)
def cv(
    params_path: str = "params.yaml",
    overrides: list[str] | None = None,
    scenes: str = SCENES,
    tiles: str = TILES,
    out: str = OUT,
    metrics: str = METRICS,
) -> dict[str, Any]:
    """Train and score ``cv.folds`` scene-grouped folds, ``study.parallel`` at a time; write cv.json."""
    params = load_params(params_path, overrides)
    tiles_dir, out_dir = Path(tiles), Path(out)
    require_inputs(Path(scenes), tiles_dir)
    with study_lock(out_dir, "cross-validation"):
        plan = plan_task(params, Path(scenes), tiles_dir, out_dir)
        folds_json = Path(plan["folds_json"])
        with cv_parent_run(params, plan) as run_id:
            common = {"params": params, "tiles": tiles_dir, "folds_json": folds_json, "parent_run_id": run_id}
            calls = [(f"cv-{t['name']}", {**common, "training": t}) for t in plan["trainings"]]
            rows = run_each(train_task, calls, parallelism(params))
            return report_task(plan, rows, Path(metrics), run_id)


def run_cv_flow(params_path: Path | str = "params.yaml", overrides: list[str] | None = None) -> dict:
    """Run the cross-validation flow once in this process (``tilepipe flow cv``)."""
    with prefect_settings():
        return cv(str(params_path), list(overrides or []))
