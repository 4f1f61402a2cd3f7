"""The scene-scaling study as a Prefect flow: a plan task, one task per training, a report task.

Each training task starts and awaits its own child process (tilepipe/study/runner.launch), so
``study.threads`` holds per training while ``study.parallel`` tasks run at once.
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
from tilepipe.study.report import terminal_table
from tilepipe.study.runner import finish, launch, parallelism, parent_run, prepare, study_lock

TILES, SPLIT, OUT = str(wiring.TILES), str(wiring.SPLIT), str(wiring.STUDY)
ARTIFACT_KEY = "tilepipe-study"
step = partial(task, cache_policy=NO_CACHE)


@step(name="study-plan")
def plan_task(params: Params, tiles: Path, split_json: Path, out: Path) -> dict[str, Any]:
    """Choose the scenes and tiles of every training and write their split files."""
    return prepare(params, tiles, split_json, out)


@step(name="study-train")
def train_task(
    params: Params, training: dict[str, Any], tiles: Path, split_json: Path, parent_run_id: str
) -> dict[str, Any]:
    """One training in its own process (a child MLflow run), scored on the held-out test scenes."""
    row = launch(params, training, tiles, split_json, parent_run_id)
    own = f", self-score {row['self']:.3f}" if row["self"] is not None else ""
    get_run_logger().info("%s (%s): held-out %.3f%s", row["name"], row["scenes"], row["heldout"], own)
    return row


@step(name="study-report")
def report_task(
    params: Params, plan: dict[str, Any], rows: list[dict[str, Any]], out: Path, parent_run_id: str
) -> dict[str, Any]:
    """Write study.csv / .json / .png, log them to the parent run, publish the table as an artifact."""
    summary = finish(params, plan, rows, out, parent_run_id)
    create_markdown_artifact(
        key=ARTIFACT_KEY,
        markdown=f"# tilepipe scene-scaling study\n\n```\n{terminal_table(summary)}\n```\n\n"
        f"MLflow parent run `{parent_run_id}`; plot and table in `{out}`.\n",
        description="held-out score against the number of training scenes",
    )
    return summary


@flow(name="tilepipe-study", log_prints=True)
def study(
    params_path: str = "params.yaml",
    overrides: list[str] | None = None,
    tiles: str = TILES,
    split: str = SPLIT,
    out: str = OUT,
) -> dict[str, Any]:
    """Train on nested scene subsets and the single-scene trap, ``study.parallel`` at a time; report."""
    params = load_params(params_path, overrides)
    tiles_dir, split_json, out_dir = Path(tiles), Path(split), Path(out)
    with study_lock(out_dir):
        return _run(params, tiles_dir, split_json, out_dir)


def _run(params: Params, tiles_dir: Path, split_json: Path, out_dir: Path) -> dict[str, Any]:
    plan = plan_task(params, tiles_dir, split_json, out_dir)
    with parent_run(params, split_json, plan) as run_id:
        common = {"params": params, "tiles": tiles_dir, "split_json": split_json, "parent_run_id": run_id}
        calls = [(f"study-{t['name']}", {**common, "training": t}) for t in plan["trainings"]]
        rows = run_each(train_task, calls, parallelism(params))
        summary = report_task(params, plan, rows, out_dir, run_id)
    return {**summary, "run_id": run_id}


def run_study_flow(params_path: Path | str = "params.yaml", overrides: list[str] | None = None) -> dict:
    """Run the study flow once in this process (``tilepipe flow study``)."""
    with prefect_settings():
        return study(str(params_path), list(overrides or []))
