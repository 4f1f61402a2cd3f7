"""The pipeline flow runs only what changed, as `dvc repro` would, and registers only a new model.

One real DVC project (a git repository holding a copy of the sources) with a tiny catalog of its
own under scenes/, and one MLflow store, shared by the tests of this module, in order: the first
run runs every stage; a second run with nothing new runs none and registers nothing; a params
change retrains; a new scene in the catalog reruns ingest, tiles that scene alone, and reruns the
stages after. After each run `dvc status` finds nothing to do. Flows run in this process against
the session's real Prefect server.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import dvc_project, write_catalog
from tests.test_flows import add_scene, file_times, flow_run_id, logs_with, row, task_runs, wait_for
from tilepipe.flows import dvc_cli
from tilepipe.flows.pipeline import pipeline

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("prefect"), pytest.mark.usefixtures("prefect_api")]

STAGES = ["ingest", "tile", "split", "analyze", "train", "predict", "evaluate"]
MODEL = "tilepipe-landcover"
TINY = {  # merged into the project's params.yaml: its own catalog, tiny tiles and a 1-epoch model
    "data": {"catalog": "scenes/catalog.csv", "imagery": "scenes"},
    "tile": {"size": 32, "stride": 32, "workers": 1, "max_nodata": 0.5},
    "train": {"epochs": 1, "width": 8, "batch_size": 32},
    "evaluate": {"min_test_tiles": 1, "min_test_scenes": 1},
}


class Project:
    """The DVC project, its MLflow store, and a way to run the flow in it."""

    def __init__(self, tmp: Path) -> None:
        self.repo, _ = dvc_project(tmp, TINY)
        self.tracking = f"sqlite:///{tmp / 'mlflow.db'}"
        scenes = self.repo / "scenes"
        scenes.mkdir()
        write_catalog(scenes, [add_scene(scenes, i) for i in range(3)])

    def run(self) -> tuple[dict[str, Any], Any, float]:
        """Run the flow with params.yaml, as a deployment does; its result, state and seconds."""
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(self.repo)
            mp.setenv("MLFLOW_TRACKING_URI", self.tracking)
            started = time.perf_counter()
            state = pipeline(params_path="params.yaml", overrides=[], return_state=True)
            seconds = time.perf_counter() - started
            assert state.is_completed(), state
            # what `dvc repro` would see now: nothing to run (synthesize: the built-in data, not used here)
            assert dvc_cli.status(*STAGES) == {}, dvc_cli.status(*STAGES)
        return state.result(), state, seconds

    def versions(self) -> list[int]:
        """The registered versions of the model."""
        found = MlflowClient(self.tracking).search_model_versions(f"name = '{MODEL}'")
        return sorted(int(v.version) for v in found)

    def set_params(self, section: str, **values: Any) -> None:
        path = self.repo / "params.yaml"
        raw = yaml.safe_load(path.read_text())
        raw[section].update(values)
        path.write_text(yaml.safe_dump(raw, sort_keys=False))


def ran_tasks(state) -> set[str]:
    """The task names (without the run suffix) the flow run ran."""
    return {name.rsplit("-", 1)[0] for name in task_runs(flow_run_id(state))}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    return Project(tmp_path_factory.mktemp("nightly"))


def test_the_first_run_runs_every_stage_and_records_it(project: Project):
    result, state, seconds = project.run()
    print(f"first run: {seconds:.1f} s")
    assert result["ran"] == STAGES and result["skipped"] == []
    assert result["tiled"] == ["s0", "s1", "s2"]
    assert project.versions() == [1] and result["model_version"] == 1
    assert {"train", "register", "dvc-commit"} <= ran_tasks(state)


def test_a_run_with_nothing_new_runs_nothing_and_registers_nothing(project: Project):
    model = project.repo / "models" / "model.pt"
    before = model.stat().st_mtime_ns
    result, state, seconds = project.run()
    print(f"nothing new: {seconds:.1f} s")
    assert result["ran"] == [] and result["skipped"] == STAGES
    assert result["model_version"] is None and project.versions() == [1]
    assert ran_tasks(state) == set()  # no task at all: no tiling, training, registering or dvc commit
    assert model.stat().st_mtime_ns == before
    run_id = flow_run_id(state)
    wait_for(lambda: logs_with(run_id, "nothing registered"), 30, "the flow run's logs")
    for stage in STAGES:
        assert logs_with(run_id, f"{stage}: unchanged, skipped"), stage


def test_a_params_change_retrains_and_registers_the_new_model(project: Project):
    project.set_params("train", lr=0.001)
    result, state, _ = project.run()
    assert result["ran"] == ["train", "predict", "evaluate"]
    assert result["skipped"] == ["ingest", "tile", "split", "analyze"]
    assert project.versions() == [1, 2] and result["model_version"] == 2
    run_id = flow_run_id(state)
    wait_for(lambda: logs_with(run_id, "train: changed"), 30, "the flow run's logs")
    assert "train" in logs_with(run_id, "train: changed")[0]  # DVC's reason: params.yaml's train


def test_a_new_scene_reruns_ingest_tiles_that_scene_alone_and_retrains(project: Project):
    tiles = project.repo / "data" / "tiles"
    kept = {scene: file_times(tiles / scene) for scene in ("s0", "s1", "s2")}
    scenes = project.repo / "scenes"
    write_catalog(scenes, [row(0), row(1), row(2), add_scene(scenes, 3)])
    result, state, _ = project.run()
    assert result["ran"] == STAGES and result["tiled"] == ["s3"]
    assert sorted(name.removeprefix("tile-") for name in task_runs(flow_run_id(state))
                  if name.startswith("tile-")) == ["s3"]  # fmt: skip
    assert {scene: file_times(tiles / scene) for scene in kept} == kept  # the others' tiles untouched
    assert (tiles / "s3" / "index.json").is_file()
    assert project.versions() == [1, 2, 3]


def test_an_evaluation_run_again_registers_no_second_version(project: Project):
    """Evaluate alone reruns (its params changed, or a run died between registering and dvc commit)."""
    project.set_params("evaluate", batch_size=128)
    result, state, _ = project.run()
    assert result["ran"] == ["evaluate"] and result["model_version"] == 3
    assert project.versions() == [1, 2, 3]
    run_id = flow_run_id(state)
    wait_for(lambda: logs_with(run_id, "registered already"), 30, "the flow run's logs")
