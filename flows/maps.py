"""The ``map-archive`` flow: ``tilepipe map`` as Prefect tasks, one per scene, on the flow's task runner.

The same steps as the command (``stages/map.py``): plan, one ``map-<scene_id>`` task per scene to
map on ``orchestrate.runner`` (a thread pool of ``tile.workers``, or Dask), finish. A task whose read
failed on the way is retried (2, 4, 8 s); one that fails for good is a ``failed`` row, and the other
scenes go on. The run leaves a table artifact of the summary and a progress artifact.
``map_deployment`` is the ``map-nightly`` deployment: the configured catalog with the champion.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.deployments.runner import RunnerDeployment
from prefect.futures import as_completed
from prefect.schedules import Cron
from prefect.settings import PREFECT_API_URL
from prefect.states import State
from prefect.tasks import Task, exponential_backoff
from prefect.types.entrypoint import EntrypointType

from tilepipe.errors import TilepipeError
from tilepipe.flows.dask_runner import api_for_workers, check_scheduler, task_runner
from tilepipe.flows.settings import check_api, prefect_settings
from tilepipe.geo.read_errors import describe_error
from tilepipe.mapping.archive import MapJob, MapOptions, ModelRef, Progress, failed_row, is_transient, map_job
from tilepipe.mapping.collection import FIELDS
from tilepipe.mapping.outputs import open_store
from tilepipe.params import Params, load_params
from tilepipe.stages.map import finish, prepare, where

ARTIFACT_KEY = "tilepipe-maps"
PROGRESS_KEY = "tilepipe-maps-progress"
BACKOFF = exponential_backoff(backoff_factor=2)  # 2, 4, 8 s, as the tile tasks
step = partial(task, cache_policy=NO_CACHE)  # no result caching: the maps' keys decide what is current


def retry_map(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry condition: a read that failed on the way, never a bad scene (``archive.is_transient``)."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - classified below
        return is_transient(exc)
    return False


@step(name="plan-maps")
def plan_task(
    params: Params, catalog: str | Path, model_spec: str, out: str | Path, options: MapOptions
) -> tuple[list[MapJob], list[dict[str, Any]], ModelRef]:
    """Resolve the model, list the archive; the scenes to map, the rows of the others, the model."""
    return prepare(params, catalog, model_spec, out, options)


@step(name="map", retries=3, retry_delay_seconds=BACKOFF, retry_condition_fn=retry_map)
def map_task(job: MapJob, params: Params, model: ModelRef, out: str, options: MapOptions) -> dict[str, Any]:
    """Map one scene into ``out`` (on whichever worker runs it); its summary row."""
    from prefect.runtime import task_run

    return map_job(job, params, model, open_store(out), options, again=task_run.run_count > 1)


@step(name="finish-maps")
def finish_task(
    params: Params, out: str | Path, rows: list[dict[str, Any]], model: ModelRef, catalog: str | Path,
    seconds: float,
) -> dict[str, Any]:  # fmt: skip
    """Write collection.json and summary.csv, log the MLflow run; publish the summary as an artifact."""
    summary = finish(params, open_store(out), rows, model, catalog, seconds)
    table = [{k: r.get(k) for k in (*FIELDS, "problem")} for r in sorted(rows, key=lambda r: r["scene_id"])]
    create_table_artifact(table, key=ARTIFACT_KEY, description=f"tilepipe map: {len(rows)} scene(s) -> {out}")
    return summary


def map_all(
    params: Params, jobs: list[MapJob], model: ModelRef, out: str, options: MapOptions
) -> list[dict[str, Any]]:
    """One map task per job on the flow's task runner; a row each, failures included, as they finish."""
    if not jobs:
        return []
    check_scheduler(params)
    progress = Progress(len(jobs), say=get_run_logger().info)
    artifact = create_progress_artifact(0.0, key=PROGRESS_KEY, description=f"scenes mapped into {out}")
    rows = []
    with api_for_workers(params), task_runner(params) as runner:
        futures = {}
        for job in jobs:
            named = map_task.with_options(task_run_name=f"map-{job.scene.scene_id}")
            args = {"job": job, "params": params, "model": model, "out": out, "options": options}
            future = runner.submit(named, args)
            futures[future.task_run_id] = (future, job)
        for future in as_completed([f for f, _ in futures.values()]):
            job = futures[future.task_run_id][1]
            try:
                rows.append(future.result())
            except Exception as exc:  # noqa: BLE001 - a failed scene is its row; the others go on
                rows.append(failed_row(job.scene, describe_error(exc)))
            progress.update(rows[-1])
            update_progress_artifact(artifact, 100.0 * len(rows) / len(jobs))
    return rows


@flow(name="map-archive", log_prints=True)
def map_archive_flow(
    params_path: str = "params.yaml",
    overrides: list[str] | None = None,
    catalog: str | None = None,
    model: str | None = None,
    out: str | None = None,
) -> dict[str, Any]:
    """Map every scene of the archive whose map is missing or stale (``map.*`` of params by default)."""
    started = time.perf_counter()
    params = load_params(params_path, overrides)
    where_from, where_to = where(catalog, out, params)
    spec = model or params.map.model or f"models:/{params.track.model_name}@champion"
    options = MapOptions(params.map.probabilities, params.map.confidence, params.map.engine)
    jobs, rows, ref = plan_task(params, where_from, spec, where_to, options)
    rows = [*rows, *map_all(params, jobs, ref, str(where_to), options)]
    summary = finish_task(params, where_to, rows, ref, where_from, time.perf_counter() - started)
    if summary["failed"]:
        raise TilepipeError(f"{summary['failed']} of {summary['scenes']} scene(s) failed (see summary.csv)")
    return {k: v for k, v in summary.items() if k != "rows"}


def run_map_flow(params_path: Path | str = "params.yaml", overrides: list[str] | None = None) -> dict:
    """Run the map-archive flow once in this process (``tilepipe flow map``)."""
    with prefect_settings():
        if PREFECT_API_URL.value():
            check_api()
        return map_archive_flow(str(params_path), list(overrides or []))


def map_deployment(
    params_path: Path | str, overrides: list[str] | None, cron: str, job_variables: dict | None = None
) -> RunnerDeployment:
    """The ``map-nightly`` deployment: the configured catalog with the champion, on ``map.cron`` (UTC)."""
    try:
        return map_archive_flow.to_deployment(
            "map-nightly", schedule=Cron(cron, timezone="UTC"),
            parameters={"params_path": str(params_path), "overrides": list(overrides or [])},
            description="map the scenes added since the last run (map.catalog, map.out) with the champion",
            entrypoint_type=EntrypointType.MODULE_PATH, tags=["tilepipe"], job_variables=job_variables or {},
        )  # fmt: skip
    except ValueError:
        raise TilepipeError(f"map.cron: {cron!r} is not a valid cron expression") from None
