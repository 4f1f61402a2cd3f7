"""The map-archive flow on a real Prefect server: one task per scene on threads or a real Dask cluster (a
worker killed mid-scene), and the map-nightly deployment run by a real `prefect worker` with the champion."""

from __future__ import annotations

import contextvars
import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from tests.conftest import write_raster, write_scene
from tests.prefect_server import stop
from tests.test_dask import Cluster, wait_until
from tests.test_flows import flow_run_id, task_runs, wait_for
from tests.test_map import PARAMS, SIZE, make_archive, make_model, tree
from tests.test_workers import POOL, finished, start_worker
from tilepipe.flows.maps import ARTIFACT_KEY, map_archive_flow
from tilepipe.mapping.archive import HOLD_MAP

pytestmark = [pytest.mark.xdist_group("prefect"), pytest.mark.usefixtures("prefect_api")]

BIN = Path(sys.executable).parent


def overrides(catalog: Path, model: Path | None, out: Path, *more: str) -> list[str]:
    sets = [f"map.catalog={catalog}", f"map.out={out}", "train.threads=1", "tile.workers=2", *more]
    return [*sets, f"map.model={model}"] if model is not None else sets


def run(workdir: Path, sets: list[str], monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    return map_archive_flow(params_path=PARAMS, overrides=sets, return_state=True)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, bytes]]:
    """Three scenes, a model and the maps `tilepipe map` makes of them (the reference)."""
    root = tmp_path_factory.mktemp("map-flow")
    catalog, model = make_archive(root / "archive"), make_model(root / "model.pt")
    out = root / "reference"
    cmd = [str(BIN / "tilepipe"), "map", str(catalog), "--model", str(model), "--out", str(out),
           "--params", PARAMS, "--set", "train.threads=1"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=300, cwd=root)  # its caches in root
    return catalog, model, tree(out)


def test_the_flow_maps_a_task_per_scene_like_the_command_and_isolates_a_bad_scene(
    tmp_path, archive, monkeypatch
):
    catalog, model, reference = archive
    out = catalog.parent.parent / "threads"  # beside the reference: the items' relative links are the same
    state = run(tmp_path, overrides(catalog, model, out), monkeypatch)
    assert state.is_completed(), state
    assert tree(out) == reference  # the command's bytes
    runs = task_runs(flow_run_id(state))
    assert sorted(n for n in runs if n.startswith("map-")) == ["map-s0", "map-s1", "map-s2"]
    others = sorted(name.rsplit("-", 1)[0] for name in runs if not name.startswith("map-"))
    assert others == ["finish-maps", "plan-maps"]
    with get_client(sync_client=True) as client:
        keyed = ArtifactFilter(key=ArtifactFilterKey(any_=[ARTIFACT_KEY]))
        found = client.read_artifacts(artifact_filter=keyed)
    table = json.loads(found[-1].data)
    assert [row["scene_id"] for row in table] == ["s0", "s1", "s2"] and table[0]["status"] == "mapped"

    # A scene without a blue band among them: its task fails once (no retry), the others are current.
    two = np.full((2, 80, 96), 7, np.uint8)
    write_raster(catalog.parent / "twoband.tif", two, descriptions=["red", "green"])
    more = catalog.with_name("more.csv")
    more.write_text(catalog.read_text() + "twoband,twoband.tif,x,,\n")
    state = run(tmp_path, overrides(more, model, out), monkeypatch)
    assert state.is_failed()
    with pytest.raises(Exception, match=r"1 of 4 scene\(s\) failed"):
        state.result()
    runs = task_runs(flow_run_id(state))
    assert sorted(n for n in runs if n.startswith("map-")) == ["map-twoband"]
    assert runs["map-twoband"].state_type.value == "FAILED" and runs["map-twoband"].run_count == 1
    summary = (out / "summary.csv").read_text()
    assert "twoband,failed" in summary and "lacks band(s) blue" in summary and "s0,current" in summary


@pytest.mark.slow
def test_a_dask_worker_killed_mid_scene_leaves_nothing_half_and_the_maps_are_the_commands(
    tmp_path, archive, monkeypatch
):
    # Worker "held" is alone at first: the seam stops its mapping of s1 for good once s1's files are
    # complete in the temp folder. Worker "spare" joins, "held" is killed: Dask maps s1 again on "spare".
    catalog, model, reference = archive
    (tmp_path / "dask").mkdir()
    cluster = Cluster(tmp_path / "dask")
    try:
        held = cluster.start_worker("held", **{HOLD_MAP: "s1"})
        out = catalog.parent.parent / "dask"
        dask = ["orchestrate.runner=dask", f"orchestrate.dask_address={cluster.address}"]
        sets = overrides(catalog, model, out, *dask)
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(contextvars.copy_context().run, run, tmp_path, sets, monkeypatch)
            wait_until(lambda: any(out.glob(".s1.*.tmp/held")), 180, "s1 held", cluster.log)
            cluster.start_worker("spare")
            os.kill(held.pid, signal.SIGKILL)
            held.wait(timeout=10)
            assert not (out / "s1").exists()  # the dead worker's files are in a temp folder only
            state = running.result(timeout=400)
        assert state.is_completed(), f"{state}\n{cluster.log()}"
        assert tree(out) == reference
        assert not list(out.glob(".s1.*")), "the dead worker's temp folder is gone"
    finally:
        cluster.close()


@pytest.mark.slow
def test_map_nightly_is_deployed_with_its_cron_and_a_worker_maps_new_scenes_with_the_champion(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    crown(project, env)
    catalog, out = project / "archive", project / "maps"  # map.catalog: a folder of GeoTIFFs
    make_archive(catalog, n=2)
    sets = [*overrides(catalog, None, out), "map.cron=30 5 * * *"]
    deploy = [str(BIN / "tilepipe"), "deploy", "--params", PARAMS, *[x for s in sets for x in ("--set", s)],
              "--pool", POOL]  # fmt: skip
    done = subprocess.run(deploy, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    with get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("map-archive/map-nightly")
        assert [s.schedule.cron for s in nightly.schedules] == ["30 5 * * *"]
        assert nightly.parameters == {"params_path": PARAMS, "overrides": sets}
        assert nightly.work_pool_name == POOL and nightly.job_variables == {"working_dir": str(project)}
        log = tmp_path / "worker.log"
        worker = start_worker(tmp_path, log, env)
        try:
            assert mapped_by_a_run(client, nightly.id, worker, log) == ["s0", "s1"]
            write_scene(catalog, "s2", size=SIZE, seed=2)["labels"].unlink()  # s2 arrives in the folder
            assert mapped_by_a_run(client, nightly.id, worker, log) == ["s2"]  # and nothing else
        finally:
            stop(worker, wait_s=30)
    item = json.loads((out / "s2" / "s2.json").read_text())
    assert item["properties"]["tilepipe:model_name"] == "tilepipe-landcover"
    assert item["properties"]["tilepipe:model_version"] == "1"


def mapped_by_a_run(client, deployment_id, worker: subprocess.Popen, log: Path) -> list[str]:
    """Run the deployment in the worker; the scenes its map tasks mapped."""
    flow_run = client.create_flow_run_from_deployment(deployment_id)
    state = wait_for(lambda: finished(client, flow_run.id, worker, log), 400, "the map run", 2)
    assert state.is_completed(), f"{state}\n{log.read_text()[-4000:]}"
    return sorted(n.removeprefix("map-") for n in task_runs(flow_run.id) if n.startswith("map-"))


def crown(project: Path, env: dict[str, str]) -> None:
    """A model.pt logged in an MLflow run, registered and crowned champion, in project's store."""
    script = f"""
import json, os, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from pathlib import Path
from tests.test_map import make_model
from tilepipe.params import load_params
from tilepipe.tracking.registry import register
from tilepipe.tracking.runs import log_trained_model, training_run
models = Path("models"); models.mkdir()
make_model(models / "model.pt")
Path("split.json").write_text(json.dumps({{"members": {{"train": [], "val": [], "test": []}}}}))
params = load_params({PARAMS!r})
with training_run(params, Path("split.json")):
    run = log_trained_model(models)
print(register(run, {{"macro_f1": 0.5}}, params, Path("split.json")))
"""
    cmd = [sys.executable, "-c", script]
    done = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "'champion': True" in done.stdout, done.stdout + done.stderr


def test_a_killed_flow_process_leaves_nothing_half_and_the_rerun_ends_byte_identical(tmp_path, archive):
    catalog, model, reference = archive
    out = catalog.parent.parent / "killed-flow"
    sets = [x for s in overrides(catalog, model, out, "tile.workers=1") for x in ("--set", s)]
    cmd = [str(BIN / "tilepipe"), "flow", "map", "--params", PARAMS, *sets]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    log = tmp_path / "flow.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env={**env, HOLD_MAP: "s1"}, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        wait_until(lambda: any(out.glob(".s1.*.tmp/held")), 240, "s1 held", log.read_text)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (out / "s1").exists() and not (out / "collection.json").exists()
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    assert tree(out) == reference
    assert not list(out.glob(".s1.*"))
