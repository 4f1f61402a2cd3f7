"""`tilepipe deploy` to a process work pool, run by a real `prefect worker` process against a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateName,
    WorkPoolFilter,
    WorkPoolFilterName,
)
from prefect.client.schemas.sorting import FlowRunSort
from prefect.states import Scheduled

from tests.prefect_server import stop
from tests.test_flows import PARAMS, logs_with, make_workspace, tiled, wait_for
from tilepipe.flows.deploy import DEFAULT_CRON

pytestmark = [pytest.mark.xdist_group("prefect"), pytest.mark.usefixtures("prefect_api")]

BIN = Path(sys.executable).parent
POOL = "tilepipe-test"


def start_worker(cwd: Path, log: Path, env: dict[str, str]) -> subprocess.Popen:
    """`prefect worker start --pool POOL --limit 1`: one flow run at a time, polled every second."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--limit", "1"],
            cwd=cwd, env={**env, "PREFECT_WORKER_QUERY_SECONDS": "1"},
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def finished(client, run_id, worker: subprocess.Popen, log: Path):
    """The final state of a flow run, or None while it runs; fails if the worker exits."""
    assert worker.poll() is None, log.read_text()[-4000:]
    state = client.read_flow_run(run_id).state
    return state if state is not None and state.is_final() else None


@pytest.mark.slow
def test_deployments_on_a_work_pool_run_on_demand_and_on_schedule_in_a_worker(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    overrides = make_workspace(project, 3)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    sets = [arg for override in overrides for arg in ("--set", override)]
    deploy = [str(BIN / "tilepipe"), "deploy", "--params", str(PARAMS), *sets, "--pool", POOL]
    done = subprocess.run(deploy, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"registered to work pool '{POOL}'" in done.stdout

    with get_client(sync_client=True) as client:
        assert client.read_work_pool(POOL).type == "process"
        nightly = client.read_deployment_by_name("tilepipe/nightly")
        on_demand = client.read_deployment_by_name("tilepipe/on-demand")
        for deployment in (nightly, on_demand):
            assert deployment.work_pool_name == POOL
            assert deployment.parameters == {"params_path": str(PARAMS), "overrides": overrides}
            assert deployment.job_variables == {"working_dir": str(project)}
        assert [s.schedule.cron for s in nightly.schedules] == [DEFAULT_CRON]
        assert on_demand.schedules == []

        # The worker starts elsewhere: the flow runs work in the deployed project folder all the same.
        log = tmp_path / "worker.log"
        worker = start_worker(tmp_path, log, env)
        try:
            # On demand, with a parameter of this run only: one epoch instead of two.
            one_epoch = [*overrides, "train.epochs=1"]
            run = client.create_flow_run_from_deployment(on_demand.id, parameters={"overrides": one_epoch})
            state = wait_for(lambda: finished(client, run.id, worker, log), 400, "the on-demand run", 2)
            assert state.is_completed(), f"{state}\n{log.read_text()[-4000:]}"
            assert tiled(run.id) == ["s0", "s1", "s2"]
            assert json.loads((project / "metrics/metrics.json").read_text())["test_tiles"] > 0
            assert len(logs_with(run.id, ": val_macro_f1")) == 1

            # The cron schedule's next run (created by the server's scheduler) moved to now: the
            # worker runs it with the deployment's own parameters (two epochs).
            upcoming = wait_for(lambda: scheduled_runs(client, nightly.id), 120, "a run of the cron schedule")
            assert all(
                r.expected_start_time.hour == 2 and r.expected_start_time.minute == 0 for r in upcoming
            )
            scheduled = upcoming[0]
            soon = datetime.now(UTC) + timedelta(seconds=2)
            client.set_flow_run_state(scheduled.id, Scheduled(scheduled_time=soon), force=True)
            state = wait_for(lambda: finished(client, scheduled.id, worker, log), 400, "the scheduled run", 2)
            assert state.is_completed(), f"{state}\n{log.read_text()[-4000:]}"
            assert client.read_flow_run(scheduled.id).parameters["overrides"] == overrides
            assert tiled(scheduled.id) == []  # the on-demand run's tiles are current
            wait_for(lambda: len(logs_with(scheduled.id, ": val_macro_f1")) == 2, 60, "its epoch logs")
        finally:
            stop(worker, wait_s=30)  # a worker can ignore SIGTERM for longer: killed then


def scheduled_runs(client, deployment_id) -> list:
    """The deployment's runs in state Scheduled for the pool's workers, soonest first."""
    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[POOL])),
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(name=FlowRunFilterStateName(any_=["Scheduled"]))
        ),
        sort=FlowRunSort.EXPECTED_START_TIME_ASC,
    )


def test_deploy_refuses_a_pool_of_another_type(tmp_path, prefect_api):
    from prefect.client.schemas.actions import WorkPoolCreate

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="not-process", type="docker"), overwrite=True)
    deploy = [str(BIN / "tilepipe"), "deploy", "--params", str(PARAMS), "--pool", "not-process"]
    done = subprocess.run(deploy, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    expected = "work pool 'not-process' is of type docker, not process: name another with --pool"
    assert done.stderr.strip() == f"tilepipe deploy: error: {expected}"
