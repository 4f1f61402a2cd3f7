"""The scene-scaling study end to end: real child processes, real MLflow store, real Prefect API."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from tests.conftest import (
    ROOT,
    prepare_tiny_pipeline,
    tiny_overrides,
    tiny_params,
)
from tilepipe import cli
from tilepipe.study.plan import plan_study, scene_orders, share, study_sizes

# One xdist worker for the module: the tiny study runs once, and the flow test shares the Prefect server.
pytestmark = pytest.mark.xdist_group("prefect")
SPLITS = ["train", "train", "train", "val", "test", "test"]
TINY = [
    "split.block_tiles=2",
    "split.buffer_tiles=0",
    "train.width=8",
    "train.batch_size=16",
    "train.min_purity=0.5",
    "evaluate.min_test_tiles=1",
    "study.epochs=2",
    "study.val_tiles=null",
    "study.parallel=2",
]
EPOCH_METRICS = ("train_loss", "val_loss", "val_accuracy", "val_macro_f1", "val_miou", "lr", "tiles_seen")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six 160 x 160 px scenes (100 tiles of 16 px each): 3 train, 1 val, 2 test; tiled and split."""
    root = tmp_path_factory.mktemp("study")
    prepare_tiny_pipeline(root, *TINY, splits=tuple(SPLITS), size=(160, 160))
    return root


def study_cli(root: Path, *args: str, out: str = "study", extra: tuple[str, ...] = ()) -> int:
    sets = [x for o in [*tiny_overrides(root), *TINY, *extra] for x in ("--set", o)]
    paths = ["--tiles", str(root / "tiles"), "--split", str(root / "split.json"), "--out", str(root / out)]
    return cli.main(["study", "--params", str(ROOT / "params.yaml"), *sets, *paths, *args])


def read_rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path) as fh:
        return {f"{r['kind']}-{r['size']}-{r['repeat']}": r for r in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def study_run(workspace: Path) -> Path:
    """One tiny study through the CLI: sizes 1 and 2, two repeats, 2 epochs, two trainings at a time."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workspace)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace / 'mlflow.db'}")
        assert study_cli(workspace, "--sizes", "1,2", "--repeats", "2") == 0
    return workspace / "study"


def test_study_writes_table_plot_and_nested_mlflow_runs(study_run: Path, workspace: Path) -> None:
    rows = read_rows(study_run / "study.csv")
    doc = json.loads((study_run / "study.json").read_text())
    planned = {f"{t['kind']}-{t['size']}-{t['repeat']}" for t in doc["trainings"]}
    assert set(rows) == planned >= {"scenes-1-0", "scenes-1-1", "scenes-2-0", "trap-1-0", "trap-1-1"}
    subsets = [(r["size"], r["scenes"]) for r in rows.values() if r["kind"] == "scenes"]
    assert len(subsets) == len(set(subsets)), "a subset drawn twice is trained once"
    for row in rows.values():
        assert row["epochs"] == "2"
        # Same tile count for every subset; the trap draws from its scene's training blocks only.
        assert row["train_tiles"] == "100" if row["kind"] == "scenes" else 0 < int(row["train_tiles"]) <= 100
        assert 0 <= float(row["heldout"]) <= 1
        assert (row["self"] != "") == (row["kind"] == "trap")
    assert rows["scenes-1-0"]["scenes"] != rows["scenes-1-1"]["scenes"], "repeats start from different scenes"
    for repeat in ("0", "1"):  # nested: the 2-scene subset holds the repeat's single scene
        if f"scenes-2-{repeat}" in rows:
            assert rows[f"scenes-1-{repeat}"]["scenes"] in rows[f"scenes-2-{repeat}"]["scenes"].split()
        assert rows[f"trap-1-{repeat}"]["scenes"] == rows[f"scenes-1-{repeat}"]["scenes"]
    assert (study_run / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert doc["summary"]["by_size"]["1"]["n"] == 2 and doc["summary"]["trap"]["self"]["n"] == 2
    one = doc["summary"]["by_size"]["1"]  # the spread across repeats and the t interval of its mean
    scores = [float(rows[f"scenes-1-{r}"]["heldout"]) for r in ("0", "1")]
    assert one["std"] == pytest.approx(np.std(scores, ddof=1), abs=2e-4)
    half = 12.7062 * np.std(scores, ddof=1) / np.sqrt(2)  # Student t, 1 degree of freedom
    assert one["ci"] == pytest.approx([np.mean(scores) - half, np.mean(scores) + half], abs=5e-4)

    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tilepipe").experiment_id])
    parents = [r for r in runs if r.data.tags.get("study") == "scene-scaling"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(rows)
    for child in children:
        tags = child.data.tags
        key = f"{tags['study.kind']}-{tags['study.size']}-{tags['study.repeat']}"
        assert tags["study.scenes"] == rows[key]["scenes"]
        for metric in EPOCH_METRICS:  # the names `tilepipe train` logs, one point per epoch
            assert [m.step for m in client.get_metric_history(child.info.run_id, metric)] == [1, 2], metric
        assert child.data.metrics["test_macro_f1"] == pytest.approx(float(rows[key]["heldout"]), abs=1e-4)
        assert ("self_macro_f1" in child.data.metrics) == (tags["study.kind"] == "trap")
    curve = client.get_metric_history(parent.info.run_id, "heldout_macro_f1")
    assert [m.step for m in curve] == [1, 2]
    for name, value in (("std", one["std"]), ("ci_low", one["ci"][0]), ("ci_high", one["ci"][1])):
        logged = client.get_metric_history(parent.info.run_id, f"heldout_macro_f1_{name}")
        assert logged[0].step == 1 and logged[0].value == pytest.approx(value)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "study")}
    assert artifacts == {"study/study.csv", "study/study.json", "study/study.png"}


def test_study_flow_repeats_the_cli_numbers(study_run: Path, workspace: Path, prefect_api: str) -> None:
    """The Prefect flow, on the same seed, retrains n1-r0 and trap-r0 to the very same scores."""
    from tilepipe.flows.study import study

    overrides = [*tiny_overrides(workspace), *TINY, "study.sizes=[1]", "study.repeats=1"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workspace)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace / 'mlflow-flow.db'}")
        state = study(
            params_path=str(ROOT / "params.yaml"),
            overrides=overrides,
            tiles=str(workspace / "tiles"),
            split=str(workspace / "split.json"),
            out=str(workspace / "flow-study"),
            return_state=True,
        )
    assert state.is_completed(), state.message
    again, first = read_rows(workspace / "flow-study" / "study.csv"), read_rows(study_run / "study.csv")
    assert sorted(again) == ["scenes-1-0", "trap-1-0"]
    for key, row in again.items():
        assert row == first[key], key


def test_plan_is_seeded_nested_and_equal_in_tiles(workspace: Path, tmp_path: Path) -> None:
    params = tiny_params(workspace, *TINY, "study.repeats=3")
    plan = plan_study(params, workspace / "tiles", workspace / "split.json", tmp_path / "a")
    assert plan == plan_study(params, workspace / "tiles", workspace / "split.json", tmp_path / "a")
    assert plan["sizes"] == [1, 2, 3] and plan["train_tiles"] == 100
    assert {t["train_tiles"] for t in plan["trainings"] if t["kind"] == "scenes"} == {100}
    assert [t["name"] for t in plan["trainings"]].count("n3-r0") == 1
    assert not any(t["name"].startswith("n3-r1") for t in plan["trainings"]), "all scenes: trained once"
    other = tiny_params(workspace, *TINY, "study.repeats=3", "study.seed=5")
    assert scene_orders(["a", "b", "c", "d"], 3, 0) != scene_orders(["a", "b", "c", "d"], 3, 5)
    assert plan_study(other, workspace / "tiles", workspace / "split.json", tmp_path / "b") != plan
    assert study_sizes(None, 6, Path("x")) == [1, 2, 4, 6] and study_sizes(None, 1, Path("x")) == [1]
    drawn = share({"a": np.arange(3), "b": np.arange(50)}, 20, np.random.default_rng(0))
    assert len(drawn["a"]) == 3 and len(drawn["b"]) == 17


@pytest.mark.parametrize(
    ("args", "extra", "needle"),
    [
        (["--sizes", "1,5"], (), "study.sizes: 5 is more than the 3 training scene(s)"),
        (["--sizes", "0"], (), "study.sizes"),
        ([], ("study.epochs=0",), "study.epochs"),
    ],
)
def test_user_mistakes_are_one_line(workspace, tmp_path, monkeypatch, capsys, args, extra, needle) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    earlier = tmp_path / "out" / "runs" / "n1-r0" / "result.json"  # an earlier study's output
    earlier.parent.mkdir(parents=True)
    earlier.write_text("{}")
    assert study_cli(workspace, *args, out=str(tmp_path / "out"), extra=extra) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0]
    assert earlier.is_file(), "a study that cannot run leaves the last one's files alone"


def test_a_second_study_into_the_same_folder_is_refused(workspace, tmp_path, monkeypatch, capsys) -> None:
    from tilepipe.study.runner import study_lock

    monkeypatch.chdir(tmp_path)
    with study_lock(tmp_path / "out"):
        assert study_cli(workspace, out=str(tmp_path / "out")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another study is writing here" in err[0]


def test_a_lost_exit_status_counts_only_beside_this_runs_result(tmp_path: Path, monkeypatch) -> None:
    """Python < 3.14's forkserver can report 255 for a finished child (CPython issue 140867)."""
    from tilepipe.errors import TilepipeError
    from tilepipe.fsutil import write_json
    from tilepipe.params import load_params
    from tilepipe.study.runner import launch, status_lost

    result = tmp_path / "result.json"
    assert not status_lost(255, result)  # no result: the child did not finish
    write_json(result, {"name": "t"})
    assert status_lost(255, result)
    assert not status_lost(1, result) and not status_lost(-15, result) and not status_lost(None, result)
    # a real child that fails (its training lacks its tags) beside an earlier run's result.json
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "t"
    folder.mkdir()
    write_json(folder / "result.json", {"name": "t", "heldout": 0.9})
    training = {"name": "t", "dir": str(folder), "seed": 0}
    with pytest.raises(TilepipeError, match=r"study training t failed \(exit 1\)"):
        launch(load_params(ROOT / "params.yaml"), training, tmp_path, tmp_path / "split.json", "parent")
    assert not (folder / "result.json").exists()
