"""The flow's tile tasks on a real Dask cluster (`dask scheduler` + `dask worker` processes, prefect-dask).

The same shards and indexes as the thread pool, byte for byte; a worker killed with SIGKILL in the
middle of a scene: Dask runs its task again on the other worker, the flow completes, and the
partial shard the dead worker left is never accepted.
"""

from __future__ import annotations

import contextvars
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from distributed import Client, get_task_stream
from prefect import flow

from tests import prefect_server
from tests.conftest import tiny_overrides, write_catalog, write_scene
from tests.prefect_server import free_port
from tests.test_flows import PARAMS, run_flow, state_names, task_runs
from tilepipe.errors import TilepipeError
from tilepipe.flows.pipeline import ingest_task, plan_task, summary_task, tile_all
from tilepipe.params import load_params
from tilepipe.tiles.store import HOLD_SCENE, SceneTiles, scene_dirs, verify_shards

pytestmark = [pytest.mark.xdist_group("prefect"), pytest.mark.usefixtures("prefect_api")]

BIN = Path(sys.executable).parent
# s1 writes several 1 MB shards, so a kill after its first one lands in the middle of the scene
TILE = ["tile.size=32", "tile.stride=16", "tile.shard_mb=1", "tile.workers=2"]


@flow(name="tile-on-dask")
def tile_flow(params_path: str, overrides: list[str]) -> list[str]:
    """The pipeline's own ingest, plan, tile and summarize tasks (no training)."""
    params = load_params(params_path, overrides)
    scenes = ingest_task(params, params.data.catalog)
    todo = plan_task(params, scenes)
    summary_task(scenes, tile_all(params, todo))
    return [scene.scene_id for scene in todo]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Three scenes of 8 shards each; the overrides that point at them."""
    folder = tmp_path_factory.mktemp("dask-scenes")
    rows = []
    for i in range(3):
        paths = write_scene(folder, f"s{i}", size=(800, 640), seed=i)
        rows.append({"scene_id": f"s{i}", "image": paths["image"].name, "labels": paths["labels"].name})
    write_catalog(folder, rows)
    return [*tiny_overrides(folder), *TILE]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, scenes: list[str]) -> dict[str, bytes]:
    """The tile folder of a thread-pool run of the same flow."""
    workdir = tmp_path_factory.mktemp("threads")
    state = run_flow(workdir, scenes, tile_flow)
    assert state.is_completed(), state
    return tree(workdir / "data/tiles")


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def spawn(args: list[str], log: Path, cwd: Path, **env: str) -> subprocess.Popen:
    """A `dask ...` process in its own session; output to log."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [str(BIN / "dask"), *args], cwd=cwd, env={**os.environ, **env},
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def stop(proc: subprocess.Popen) -> None:
    """A Dask process group, killed if it has not stopped 5 s after SIGTERM."""
    prefect_server.stop(proc, wait_s=5)


class Cluster:
    """A `dask scheduler` on a free port of 127.0.0.1 and the `dask worker` processes started on it."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        args = ["scheduler", "--host", "127.0.0.1", "--port", str(self.port), "--no-dashboard"]
        self.scheduler = spawn(args, folder / "scheduler.log", folder)
        self.workers: dict[str, subprocess.Popen] = {}
        self.client = Client(self.address, timeout=60, set_as_default=False)  # not the flow's

    def start_worker(self, name: str, **env: str) -> subprocess.Popen:
        """One single-threaded worker process, no nanny (a killed worker stays dead), cwd elsewhere."""
        args = ["worker", self.address, "--name", name, "--nworkers", "1", "--nthreads", "1"]
        args += ["--no-nanny", "--host", "127.0.0.1", "--no-dashboard"]
        self.workers[name] = spawn(args, self.folder / f"{name}.log", self.folder, **env)
        self.client.wait_for_workers(len([w for w in self.workers.values() if w.poll() is None]), timeout=120)
        return self.workers[name]

    def log(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.folder.glob("*.log")))

    def close(self) -> None:
        self.client.close()
        for proc in [*self.workers.values(), self.scheduler]:
            stop(proc)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    folder = tmp_path / "dask"
    folder.mkdir()
    started = Cluster(folder)
    try:
        yield started
    finally:
        started.close()


def wait_until(check: Callable[[], object], timeout: float, what: str, log: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{log()}")
        time.sleep(0.05)


@pytest.mark.slow
def test_two_dask_workers_write_the_thread_pools_bytes(tmp_path, scenes, reference, cluster):
    for name in ("w0", "w1"):
        cluster.start_worker(name)
    workdir = tmp_path / "work"
    workdir.mkdir()
    dask = [*scenes, "orchestrate.runner=dask", f"orchestrate.dask_address={cluster.address}"]
    with get_task_stream(client=cluster.client) as stream:
        state = run_flow(workdir, dask, tile_flow)
    assert state.is_completed(), f"{state}\n{cluster.log()}"
    assert state.result() == ["s0", "s1", "s2"]
    assert tree(workdir / "data/tiles") == reference  # shards, indexes and summary, byte for byte
    ran_on = {task["worker"] for task in stream.data}
    assert len(ran_on) == 2, f"the tile tasks ran on {ran_on}, not on both workers"


@pytest.mark.slow
def test_without_an_address_a_local_cluster_of_tile_workers_processes_tiles(
    tmp_path, scenes, reference, caplog
):
    state = run_flow(tmp_path, [*scenes, "orchestrate.runner=dask"], tile_flow)
    assert state.is_completed(), state
    assert tree(tmp_path / "data/tiles") == reference
    assert "Creating a new Dask cluster with `distributed.deploy.local.LocalCluster`" in caplog.text


@pytest.mark.slow
def test_a_worker_killed_mid_scene_is_replaced_and_no_partial_shard_is_accepted(
    tmp_path, scenes, reference, cluster
):
    # Worker "held" is the only one at first: the test seam stops its tiling of s1 for good after the
    # first of s1's shards, a fixed point in the middle of the scene. Worker "spare" joins, "held" dies.
    assert len([name for name in reference if name.startswith("s1/images-")]) >= 3
    held = cluster.start_worker("held", **{HOLD_SCENE: "s1"})
    workdir = tmp_path / "work"
    workdir.mkdir()
    tiles = workdir / "data/tiles"
    dask = [*scenes, "orchestrate.runner=dask", f"orchestrate.dask_address={cluster.address}"]
    with ThreadPoolExecutor(1) as pool:
        # in this context: the thread then sees the session's Prefect server (settings are context variables)
        running = pool.submit(contextvars.copy_context().run, run_flow, workdir, dask, tile_flow)
        wait_until(lambda: any(tiles.glob(".s1.*.tmp/held")), 120, "s1's first shard", cluster.log)
        partial = sorted(p.name for p in next(tiles.glob(".s1.*.tmp")).iterdir())
        cluster.start_worker("spare")
        os.kill(held.pid, signal.SIGKILL)
        held.wait(timeout=10)
        assert "s1" not in scene_dirs(tiles)  # the dead worker's partial output is in a temp folder only
        state = running.result(timeout=300)

    assert "images-00000.npy" in partial and "index.json" not in partial, partial
    assert state.is_completed(), f"{state}\n{cluster.log()}"
    assert tree(tiles) == reference  # s1 tiled again whole elsewhere; the dead worker's temp folder gone
    for scene_dir in scene_dirs(tiles).values():
        tiles_of = SceneTiles(scene_dir)  # verifies every shard's checksum
        assert verify_shards(scene_dir, tiles_of.index) is None
    runs = task_runs(state.state_details.flow_run_id)
    assert sorted(name for name in runs if name.startswith("tile-")) == ["tile-s0", "tile-s1", "tile-s2"]
    assert all(run.state_type.value == "COMPLETED" for run in runs.values())
    assert state_names(runs["tile-s1"]).count("Running") >= 1


def test_an_address_where_no_scheduler_listens_fails_in_one_line(tmp_path, scenes):
    port = free_port()
    dask = [*scenes, "orchestrate.runner=dask", f"orchestrate.dask_address=tcp://127.0.0.1:{port}"]
    state = run_flow(tmp_path, dask, tile_flow)
    assert state.is_failed()
    with pytest.raises(
        TilepipeError, match=rf"orchestrate.dask_address: no Dask scheduler answers at tcp://127.0.0.1:{port}"
    ):
        state.result()


def test_orchestrate_params_are_checked():
    assert load_params(PARAMS).orchestrate.runner == "threads"
    with pytest.raises(TilepipeError, match=r"orchestrate\.dask_address: String should match pattern"):
        load_params(PARAMS, ["orchestrate.runner=dask", "orchestrate.dask_address=127.0.0.1"])
    with pytest.raises(TilepipeError, match="dask_address is set but runner is threads"):
        load_params(PARAMS, ["orchestrate.dask_address=tcp://127.0.0.1:8786"])
