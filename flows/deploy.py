"""Prefect deployments of the pipeline flow, served from this process: nightly and on demand."""

from __future__ import annotations

from pathlib import Path

import prefect
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron
from prefect.types.entrypoint import EntrypointType

from tilepipe.errors import TilepipeError
from tilepipe.flows.pipeline import pipeline
from tilepipe.flows.settings import check_api, prefect_settings
from tilepipe.params import Params, load_params

DEFAULT_CRON = "0 2 * * *"  # 02:00 UTC every night, until params.yaml holds the schedule (schedule.cron)


def nightly_cron(params: Params) -> str:
    """The nightly cron: ``schedule.cron`` of params once that key exists, else DEFAULT_CRON."""
    return getattr(getattr(params, "schedule", None), "cron", None) or DEFAULT_CRON


def deployments(
    params_path: Path | str = "params.yaml", overrides: list[str] | None = None, cron: str = DEFAULT_CRON
) -> list[RunnerDeployment]:
    """The "nightly" deployment (cron schedule) and the unscheduled "on-demand" one, same parameters."""
    common = {
        "parameters": {"params_path": str(params_path), "overrides": list(overrides or [])},
        "entrypoint_type": EntrypointType.MODULE_PATH,  # tilepipe.flows.pipeline.pipeline, from any directory
        "tags": ["tilepipe"],
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
        prefect.serve(*deployments(params_path, overrides, cron or nightly_cron(params)), limit=1)
