"""The Prefect flow on a real Prefect API: end to end, deployments, retries, incremental tiling, parity."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
import pytest
import rasterio
from prefect import State, flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import TaskRun
from prefect.exceptions import ObjectNotFound
from rasterio.errors import RasterioError

import tilepipe.flows.pipeline as pipeline_module
from tests.conftest import (
    ROOT,
    cut_pixel_data,
    dvc_project,
    tiny_overrides,
    write_catalog,
    write_raster,
    write_scene,
)
from tilepipe.errors import TilepipeError
from tilepipe.flows.deploy import DEFAULT_CRON
from tilepipe.flows.pipeline import ingest_task, pipeline, plan_task, tile_all
from tilepipe.flows.report import ARTIFACT_KEY
from tilepipe.params import load_params
from tilepipe.stages.tile import tile_one

pytestmark = [pytest.mark.xdist_group("prefect"), pytest.mark.usefixtures("prefect_api")]

BIN = Path(sys.executable).parent
PARAMS = ROOT / "params.yaml"
TINY = [
    "tile.size=32",
    "tile.stride=32",
    "tile.workers=2",
    "train.epochs=2",
    "train.width=8",
    "train.batch_size=32",
    "evaluate.min_test_tiles=1",
]
# Tiny params written INTO params.yaml for the DVC parity test (as in test_dvc_pipeline.py).
TINY_YAML = {
    "synthesize": {"scenes": 5, "min_size": 160, "max_size": 260, "seed": 3},
    "tile": {"size": 32, "stride": 32, "workers": 2},
    "train": {"epochs": 2, "width": 8, "batch_size": 32},
    "evaluate": {"min_test_tiles": 1},
}


# ----------------------------------------------------------------------------------------- helpers


def row(i: int) -> dict[str, str]:
    """The catalog row of scene s<i>."""
    return {"scene_id": f"s{i}", "image": f"s{i}.tif", "labels": f"s{i}_labels.tif"}


def add_scene(folder: Path, i: int, size: tuple[int, int] = (200, 180)) -> dict[str, str]:
    """Write scene s<i> (UTM 33N or 10N) into folder; return its catalog row."""
    write_scene(folder, f"s{i}", size=size, seed=i, crs="EPSG:32633" if i % 2 == 0 else "EPSG:32610")
    return row(i)


def make_workspace(root: Path, n: int, size: tuple[int, int] = (200, 180)) -> list[str]:
    """n tiny scenes with a catalog under root/scenes; returns the flow's overrides for them."""
    scenes = root / "scenes"
    scenes.mkdir(parents=True, exist_ok=True)
    write_catalog(scenes, [add_scene(scenes, i, size) for i in range(n)])
    return [*tiny_overrides(scenes), *TINY]


def run_flow(workdir: Path, overrides: list[str], fn: Callable = pipeline, **patches: Any) -> State:
    """Run a flow in this process with workdir as working directory; returns its final state."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
        for name, value in patches.items():
            mp.setattr(pipeline_module, name, value)
        return fn(params_path=str(PARAMS), overrides=overrides, return_state=True)


def flow_run_id(state: State) -> UUID:
    """The id of the flow run a final state belongs to."""
    return state.state_details.flow_run_id


def task_runs(run_id: UUID) -> dict[str, TaskRun]:
    """The task runs of a flow run, read back from the API, by name."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    return {run.name: run for run in runs}


def tiled(run_id: UUID) -> list[str]:
    """Scene ids of the tile task runs of a flow run (task runs are named tile-<scene_id>)."""
    return sorted(name.removeprefix("tile-") for name in task_runs(run_id) if name.startswith("tile-"))


def state_names(task_run: TaskRun) -> list[str]:
    """The state history of a task run, oldest first."""
    with get_client(sync_client=True) as client:
        return [s.name for s in client.read_task_run_states(task_run.id)]


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 1.0) -> Any:
    """Poll check() until it returns something truthy without raising ObjectNotFound."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if result := check():
                return result
        except ObjectNotFound:
            pass
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def logs_with(run_id: UUID, text: str) -> list[str]:
    """Messages of a flow run's logs (its tasks' too) that contain text."""
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    return [log.message for log in logs if text in log.message]


def file_times(folder: Path) -> dict[str, int]:
    """mtime (ns) of every file under folder."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@flow(name="tile-only")
def tile_only(params_path: str, overrides: list[str]) -> list[str]:
    """The pipeline's own ingest, plan and tile tasks, without training: for the retry tests."""
    params = load_params(params_path, overrides)
    todo = plan_task(params, ingest_task(params, params.data.catalog))
    return [path.name for path in tile_all(params, todo)]


# -------------------------------------------------------------------- the full flow, run in process


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A working directory with three tiny scenes; the flow's overrides for them."""
    root = tmp_path_factory.mktemp("flow")
    return root, make_workspace(root, 3)


@pytest.fixture(scope="module")
def first_run(workspace: tuple[Path, list[str]]) -> dict[str, Any]:
    """The flow's first run on the workspace, and a snapshot of what it wrote."""
    root, overrides = workspace
    state = run_flow(root, overrides)
    assert state.is_completed(), state
    return {
        "state": state,
        "summary": json.loads((root / "data/tiles/summary.json").read_text()),
        "split": json.loads((root / "data/split/split.json").read_text()),
        "metrics": json.loads((root / "metrics/metrics.json").read_text()),
        "run": json.loads((root / "models/run.json").read_text()),
    }


def test_flow_runs_end_to_end_and_publishes_metrics(workspace, first_run):
    root, _ = workspace
    run_id = flow_run_id(first_run["state"])
    names = task_runs(run_id)
    assert tiled(run_id) == ["s0", "s1", "s2"]
    for step in (
        "ingest",
        "plan-tiles",
        "summarize-tiles",
        "split",
        "analyze",
        "train",
        "predict",
        "evaluate",
        "register",
    ):
        assert any(name.startswith(f"{step}-") for name in names), (step, sorted(names))
    assert not any(name.startswith("synthesize") for name in names)  # not the built-in catalog
    assert all(run.state_type.value == "COMPLETED" for run in names.values())

    assert first_run["summary"]["scenes"] == 3 and all(first_run["summary"]["tiles"].values())
    assert {k: len(v) for k, v in first_run["split"]["members"].items()} == {"train": 1, "val": 1, "test": 1}
    assert (root / "models/model.pt").is_file()
    metrics = first_run["metrics"]
    assert 0.0 <= metrics["macro_f1"] <= 1.0 and "baseline_macro_f1" in metrics
    assert metrics["map_scenes"] == 1 and 0.0 <= metrics["map_macro_f1"] <= 1.0  # the test scene's map
    test_scene = next(iter(first_run["split"]["members"]["test"]))
    assert (root / "predictions" / f"{test_scene}.tif").is_file()
    assert (root / "metrics" / "scenes" / f"{test_scene}.png").is_file()
    result = first_run["state"].result()
    assert result["run_id"] == first_run["run"]["run_id"] and result["macro_f1"] == metrics["macro_f1"]
    assert result["tiled"] == ["s0", "s1", "s2"]

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[ARTIFACT_KEY])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])),
        )
    assert [a.type for a in artifacts] == ["markdown"]
    markdown = artifacts[0].data
    assert first_run["run"]["run_id"] in markdown
    assert f"| macro-F1 | {metrics['macro_f1']:.4f} | {metrics['baseline_macro_f1']:.4f} |" in markdown

    # The run's last log line says why dvc.lock is not updated; once it is on the server, so is
    # the line per epoch the on_epoch callback logged.
    wait_for(lambda: logs_with(run_id, "not a DVC project"), 30, "the flow run's logs")
    epochs = logs_with(run_id, ": val_macro_f1")
    assert [line.split(":")[0] for line in epochs] == ["epoch 1", "epoch 2"], epochs
    assert "train_loss" in epochs[0]


def test_bad_override_fails_the_flow_at_once_naming_the_key(workspace):
    root, overrides = workspace
    state = run_flow(root, [*overrides, "tile.size=-3"])
    assert state.is_failed()
    with pytest.raises(TilepipeError, match=r"tile\.size"):
        state.result()
    assert task_runs(flow_run_id(state)) == {}


def test_rerun_tiles_nothing_and_a_new_scene_tiles_alone(workspace, first_run):
    root, overrides = workspace
    before = file_times(root / "data/tiles/s0")
    second = run_flow(root, overrides)
    assert second.is_completed(), second
    assert tiled(flow_run_id(second)) == []
    assert file_times(root / "data/tiles/s0") == before

    scenes = root / "scenes"
    write_catalog(scenes, [row(0), row(1), row(2), add_scene(scenes, 3)])
    third = run_flow(root, overrides)
    assert third.is_completed(), third
    assert tiled(flow_run_id(third)) == ["s3"]
    assert file_times(root / "data/tiles/s0") == before
    summary = json.loads((root / "data/tiles/summary.json").read_text())
    assert sorted(summary["tiles"]) == ["s0", "s1", "s2", "s3"]


def test_flow_without_a_prefect_server_starts_a_temporary_one(tmp_path):
    """`tilepipe flow` with no PREFECT_API_URL: Prefect's temporary server runs the flow, then stops."""
    overrides = make_workspace(tmp_path, 3)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),  # its own database, not the session server's
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    sets = [x for o in [*overrides, "train.epochs=1"] for x in ("--set", o)]
    cmd = [str(BIN / "tilepipe"), "flow", "--params", str(PARAMS), *sets]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "Starting temporary server on http://127.0.0.1:" in result.stdout + result.stderr
    metrics = json.loads((tmp_path / "metrics" / "metrics.json").read_text())
    assert metrics["test_scenes"] >= 1 and 0 <= metrics["accuracy"] <= 1


# ---------------------------------------------------------------- tile tasks: retries, incremental


TRANSIENT = [
    OSError(errno.EIO, "injected transient I/O error"),
    OSError(errno.ECONNRESET, "Connection reset by peer"),
    RasterioError("s1.tif: HTTP response code: 503 - failed to read"),
    RasterioError("CPLE_HttpResponse: curl error: Operation timed out after 30000 milliseconds"),
]
DAMAGED = [
    TilepipeError("s1.tif: injected bad input"),
    RasterioError("s1.tif, band 1: IReadBlock failed at X offset 0, Y offset 2: TIFFReadEncodedTile failed"),
]


def flaky_tiling(calls: Counter, error: Exception, failures: int) -> Callable:
    """tile_one, but scene s1 raises ``error`` on its first ``failures`` attempts."""

    def tile(scene, params, out_dir):
        calls[scene.scene_id] += 1
        if scene.scene_id == "s1" and calls["s1"] <= failures:
            raise error
        return tile_one(scene, params, out_dir)

    return tile


@pytest.mark.parametrize("transient", TRANSIENT, ids=["EIO", "ECONNRESET", "HTTP-503", "curl-timeout"])
def test_a_transient_tile_error_is_retried(tmp_path, transient):
    overrides = make_workspace(tmp_path, 3, size=(96, 80))
    calls: Counter[str] = Counter()
    state = run_flow(tmp_path, overrides, tile_only, tile_one=flaky_tiling(calls, transient, 1))
    assert state.is_completed(), state
    assert calls == {"s0": 1, "s1": 2, "s2": 1}
    runs = task_runs(flow_run_id(state))
    assert runs["tile-s1"].run_count == 2 and runs["tile-s1"].state_type.value == "COMPLETED"
    assert "AwaitingRetry" in state_names(runs["tile-s1"])
    assert runs["tile-s0"].run_count == 1
    assert (tmp_path / "data/tiles/s1/index.json").is_file()


def test_a_transient_error_that_persists_fails_after_three_retries(tmp_path):
    overrides = make_workspace(tmp_path, 3, size=(96, 80))
    calls: Counter[str] = Counter()
    error = OSError(errno.ECONNRESET, "Connection reset by peer")
    state = run_flow(tmp_path, overrides, tile_only, tile_one=flaky_tiling(calls, error, 99))
    assert state.is_failed()
    assert calls == {"s0": 1, "s1": 4, "s2": 1}  # the first attempt and 3 retries
    runs = task_runs(flow_run_id(state))
    assert runs["tile-s1"].run_count == 4 and runs["tile-s1"].state_type.value == "FAILED"
    assert state_names(runs["tile-s1"]).count("AwaitingRetry") == 3


@pytest.mark.parametrize("damaged", DAMAGED, ids=["TilepipeError", "undecodable-block"])
def test_bad_input_in_a_tile_task_is_not_retried(tmp_path, damaged):
    overrides = make_workspace(tmp_path, 3, size=(96, 80))
    calls: Counter[str] = Counter()
    state = run_flow(tmp_path, overrides, tile_only, tile_one=flaky_tiling(calls, damaged, 99))
    assert state.is_failed()
    with pytest.raises(type(damaged), match="s1.tif"):
        state.result()
    assert calls == {"s0": 1, "s1": 1, "s2": 1}  # the other scenes still finish
    runs = task_runs(flow_run_id(state))
    assert runs["tile-s1"].run_count == 1 and runs["tile-s1"].state_type.value == "FAILED"
    assert "AwaitingRetry" not in state_names(runs["tile-s1"])
    assert runs["tile-s0"].state_type.value == "COMPLETED"


def test_a_damaged_file_fails_its_tile_task_once_naming_the_pixels(tmp_path):
    """A real GeoTIFF cut short in its pixel data (header intact): one attempt, one clear error."""
    overrides = make_workspace(tmp_path, 3, size=(256, 256))
    image = tmp_path / "scenes" / "s1.tif"
    with rasterio.open(image) as src:  # the same pixels without a nodata value: ingest reads none
        data, crs, transform = src.read(), src.crs, src.transform
    write_raster(image, np.maximum(data, 1), crs, transform, descriptions=["red", "green", "blue"])
    cut_pixel_data(image)
    state = run_flow(tmp_path, overrides, tile_only)
    assert state.is_failed()
    with pytest.raises(TilepipeError, match=r"s1\.tif: scene s1: damaged data: rows \d+-\d+, columns"):
        state.result()
    runs = task_runs(flow_run_id(state))
    assert runs["tile-s1"].run_count == 1 and "AwaitingRetry" not in state_names(runs["tile-s1"])
    assert {runs[f"tile-{s}"].state_type.value for s in ("s0", "s2")} == {"COMPLETED"}
    assert sorted(p.name for p in (tmp_path / "data/tiles").iterdir()) == ["s0", "s2"]


def test_corrupt_or_deleted_tiles_are_rebuilt_alone(tmp_path):
    overrides = make_workspace(tmp_path, 3, size=(96, 80))
    assert run_flow(tmp_path, overrides, tile_only).result() == ["s0", "s1", "s2"]
    tiles = tmp_path / "data/tiles"
    assert run_flow(tmp_path, overrides, tile_only).result() == []
    untouched = file_times(tiles / "s1")
    shard = next((tiles / "s0").glob("images-*.npy"))
    shard.write_bytes(shard.read_bytes()[:-7])  # truncated
    shutil.rmtree(tiles / "s2")
    state = run_flow(tmp_path, overrides, tile_only)
    assert sorted(state.result()) == ["s0", "s2"] == tiled(flow_run_id(state))
    assert file_times(tiles / "s1") == untouched


# ------------------------------------------------------------------------ deployments, served


def test_deployments_are_served_and_a_run_on_demand_completes(tmp_path):
    overrides = make_workspace(tmp_path, 3)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
    }
    sets = [arg for override in overrides for arg in ("--set", override)]
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(BIN / "tilepipe"), "serve", "--params", str(PARAMS), *sets],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        with get_client(sync_client=True) as client:

            def deployment(name: str):
                assert proc.poll() is None, log.read_text()
                return client.read_deployment_by_name(f"tilepipe/{name}")

            nightly = wait_for(lambda: deployment("nightly"), 120, "the nightly deployment")
            on_demand = wait_for(lambda: deployment("on-demand"), 60, "the on-demand deployment")
            assert [s.schedule.cron for s in nightly.schedules] == [DEFAULT_CRON]
            assert on_demand.schedules == []
            assert on_demand.parameters == {"params_path": str(PARAMS), "overrides": overrides}

            run = client.create_flow_run_from_deployment(on_demand.id)

            def final_state():
                assert proc.poll() is None, log.read_text()
                state = client.read_flow_run(run.id).state
                return state if state is not None and state.is_final() else None

            state = wait_for(final_state, 300, "the on-demand flow run to finish", interval=2)
            assert state.is_completed(), f"{state}\n{log.read_text()[-4000:]}"
        assert json.loads((tmp_path / "metrics/metrics.json").read_text())["test_tiles"] > 0
        assert tiled(run.id) == ["s0", "s1", "s2"]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


# ------------------------------------------------------------------------------- parity with DVC


def _sh(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def _outputs(repo: Path) -> dict[str, bytes]:
    """The bytes of every tile store file, the ingested catalog and the split."""
    files = [*sorted((repo / "data/tiles").rglob("*")), repo / "data/ingest/scenes.json"]
    files.append(repo / "data/split/split.json")
    return {str(p.relative_to(repo)): p.read_bytes() for p in files if p.is_file()}


def _weights(path: Path) -> tuple[dict, dict]:
    import torch

    blob = torch.load(path, map_location="cpu", weights_only=True)
    return blob["meta"], {k: v.numpy().tobytes() for k, v in blob["state_dict"].items()}


def test_flow_matches_dvc_repro_and_leaves_dvc_up_to_date(tmp_path):
    repo, env = dvc_project(tmp_path, TINY_YAML)

    assert "Running stage 'tile'" in _sh(["dvc", "repro"], repo, env).stdout
    reference = _outputs(repo)
    metrics = json.loads((repo / "metrics/metrics.json").read_text())
    model = _weights(repo / "models/model.pt")
    assert sum(name.endswith(".npy") for name in reference) >= 10

    for out in ("data/tiles", "models", "predictions", "metrics", "data/split", "data/ingest"):
        shutil.rmtree(repo / out)
    (repo / "dvc.lock").unlink()
    flow = _sh([str(BIN / "tilepipe"), "flow"], repo, env)

    assert _outputs(repo) == reference  # byte-identical tile shards, indexes, catalog and split
    assert json.loads((repo / "metrics/metrics.json").read_text()) == metrics
    assert _weights(repo / "models/model.pt") == model  # same weights (the file's bytes differ)
    assert "synthesize" in flow.stdout + flow.stderr  # dvc.lock was gone, so synthesize ran again

    status = subprocess.run(["dvc", "status", "-q"], cwd=repo, env=env, capture_output=True, text=True)
    assert status.returncode == 0, _sh(["dvc", "status"], repo, env).stdout
    again = _sh(["dvc", "repro"], repo, env)
    assert "Running stage" not in again.stdout, again.stdout

    # With overrides the stages see other params than params.yaml: dvc.lock must not record them.
    # (In a subprocess: the test process may hold stages modules older than the files.)
    check = (
        "from tilepipe.flows import dvc_cli as dvc\n"
        "from tilepipe.params import load_params\n"
        "assert dvc.why_not_commit(load_params('params.yaml')) is None\n"
        "assert 'params.yaml' in dvc.why_not_commit(load_params('params.yaml', ['train.epochs=3']))\n"
        "assert dvc.synthesis_is_current(load_params('params.yaml'))\n"
    )
    _sh([sys.executable, "-c", check], repo, env)
    lock = (repo / "dvc.lock").read_bytes()
    overridden = _sh([str(BIN / "tilepipe"), "flow", "--set", "train.epochs=1"], repo, env)
    assert (repo / "dvc.lock").read_bytes() == lock, "a run with --set must leave dvc.lock alone"
    assert "dvc.lock not updated" in overridden.stdout + overridden.stderr
    assert "params.yaml" in overridden.stdout + overridden.stderr
