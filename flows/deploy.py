"""Prefect deployments of the pipeline flow, nightly and on demand, and map-nightly: served or run by workers.

``tilepipe serve`` serves them from its own process; ``tilepipe deploy`` registers them to a process
work pool whose ``prefect worker`` processes run them.
"""

from __future__ import annotations

from pathlib import Path

import prefect
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.deployments.runner import RunnerDeployment
from prefect.exceptions import ObjectNotFound
from prefect.schedules import Cron
from prefect.types.entrypoint import EntrypointType

from tilepipe.errors import TilepipeError
from tilepipe.flows.maps import map_deployment
from tilepipe.flows.pipeline import pipeline
from tilepipe.flows.settings import check_api, prefect_settings
from tilepipe.params import Params, ScheduleParams, load_params

DEFAULT_POOL = "tilepipe"
DEFAULT_CRON = ScheduleParams().cron  # schedule.cron's default: 02:00 UTC every night


def nightly_cron(params: Params) -> str:
    """The nightly cron: ``schedule.cron`` of params (validated there, its default DEFAULT_CRON)."""
    return params.schedule.cron


def deployments(
    params_path: Path | str = "params.yaml",
    overrides: list[str] | None = None,
    cron: str = DEFAULT_CRON,
    job_variables: dict | None = None,
) -> list[RunnerDeployment]:
    """The "nightly" deployment (cron schedule) and the unscheduled "on-demand" one, same parameters."""
    common = {
        "parameters": {"params_path": str(params_path), "overrides": list(overrides or [])},
        "entrypoint_type": EntrypointType.MODULE_PATH,  # tilepipe.flows.pipeline.pipeline, from any directory
        "tags": ["tilepipe"],
        "job_variables": job_variables or {},
    }
    try:
        nightly = pipeline.to_deployment(
            "nightly", schedule=Cron(cron, timezone="UTC"), description="nightly pipeline run", **common
        )
    except ValueError:
        raise TilepipeError(f"nightly schedule: {cron!r} is not a valid cron expression") from None
    return [
        nightly,
        pipeline.to_deployment("on-demand", description="run with `prefect deployment run`", **common),
    ]


def serve(
    params_path: Path | str = "params.yaml", overrides: list[str] | None = None, cron: str | None = None
) -> None:
    """Serve both deployments until interrupted, one flow run at a time (they share the working dir)."""
    params = load_params(params_path, overrides)
    check_api()
    with prefect_settings():
        items = deployments(params_path, overrides, cron or nightly_cron(params))
        prefect.serve(*items, map_deployment(params_path, overrides, params.map.cron), limit=1)


def deploy(
    params_path: Path | str = "params.yaml",
    overrides: list[str] | None = None,
    pool: str = DEFAULT_POOL,
    workdir: Path | None = None,
) -> Path:
    """Register the three deployments to the process work pool ``pool`` (created if missing); returns workdir.

    A `prefect worker start --pool POOL` process then runs each flow run in a subprocess whose
    working directory is ``workdir`` (default: this one), the project folder on the worker's machine.
    The flow code is the installed tilepipe package (a module path, no image and no code upload).
    """
    params = load_params(params_path, overrides)
    check_api()
    folder = (workdir or Path.cwd()).resolve()
    with prefect_settings():
        ensure_pool(pool)
        job = {"working_dir": str(folder)}
        items = deployments(params_path, overrides, nightly_cron(params), job)
        items.append(map_deployment(params_path, overrides, params.map.cron, job))
        prefect.deploy(
            *items, work_pool_name=pool, build=False, push=False, print_next_steps_message=False,
            ignore_warnings=True,
        )  # fmt: skip
    return folder


def ensure_pool(name: str) -> None:
    """Create the work pool ``name`` of type process, as `prefect work-pool create --type process` does."""
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=template))
            return
    if pool.type != "process":
        raise TilepipeError(
            f"work pool {name!r} is of type {pool.type}, not process: name another with --pool"
        )
