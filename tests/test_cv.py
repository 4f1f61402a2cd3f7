"""Scene-grouped cross-validation: the folds, `tilepipe cv` end to end (child processes, a real MLflow
store) and `tilepipe flow cv` on a real Prefect API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from tests.conftest import ROOT, prepare_tiny_pipeline, tiny_overrides, tiny_params
from tilepipe import cli
from tilepipe.errors import TilepipeError
from tilepipe.results import cv_label
from tilepipe.study.cv import plan_cv
from tilepipe.study.folds import assign_folds

pytestmark = pytest.mark.xdist_group("prefect")  # the flow test shares the session's Prefect server
RATIOS = {"train": 0.6, "val": 0.2, "test": 0.2}
TINY = [
    "train.width=8",
    "train.batch_size=8",
    "train.lr=0.01",
    "train.min_purity=0.5",
    "train.epochs=1",
    "evaluate.min_test_tiles=1",
    "study.parallel=2",
]
SCENES = [f"s{i}" for i in range(7)]


def test_every_scene_is_tested_once_and_the_folds_are_seeded():
    folds = assign_folds(SCENES, {}, 3, 42, RATIOS, Path("scenes.json"))
    tested = sorted(s for f in folds for s in f["test"])
    assert tested == SCENES and len(folds) == 3
    assert sorted(len(f["test"]) for f in folds) == [2, 2, 3]
    for f in folds:
        assert f["val"] and f["train"], "every fold validates and trains on other scenes"
        assert sorted(f["train"] + f["val"] + f["test"]) == SCENES, "disjoint, and every scene used"
        assert len(f["val"]) == round(0.25 * (7 - len(f["test"])))  # val : train as in split.ratios
    assert folds == assign_folds(SCENES, {}, 3, 42, RATIOS, Path("scenes.json"))
    assert folds != assign_folds(SCENES, {}, 3, 7, RATIOS, Path("scenes.json"))


def test_scenes_pinned_by_the_catalog_keep_their_split():
    pinned = {"s0": "test", "s1": "test", "s2": "train", "s3": "val"}
    folds = assign_folds(SCENES, pinned, 3, 42, RATIOS, Path("scenes.json"))
    tested = sorted(s for f in folds for s in f["test"])
    assert tested == ["s0", "s1", "s4", "s5", "s6"], "pinned train and val scenes are never tested"
    for f in folds:
        assert "s2" in f["train"] and "s3" in f["val"]
        assert not {"s0", "s1"} & {*f["train"], *f["val"]}, "a scene marked test is never trained on"


@pytest.mark.parametrize(
    ("scenes", "pinned", "folds", "needle"),
    [
        (["s0"], {}, 2, "only one labelled scene: one scene is one sample of the world"),
        (SCENES, {}, 8, "cv.folds=8 but only 7 scene(s) can be tested"),
        (SCENES, dict.fromkeys(SCENES[:5], "train"), 3, "only 2 scene(s) can be tested (5 pinned to train"),
        (["s0", "s1", "s2"], {}, 2, "fold 1 of 2 tests 2 of 3 scenes and leaves no training scene"),
    ],
)
def test_folds_that_cannot_be_made_are_one_line(scenes, pinned, folds, needle):
    with pytest.raises(TilepipeError, match="^scenes.json: ") as error:
        assign_folds(scenes, pinned, folds, 42, RATIOS, Path("scenes.json"))
    assert needle in str(error.value) and "\n" not in str(error.value)


def test_the_plan_keeps_the_catalog_split_column(tmp_path):
    """The tiny pipeline pins s0, s1 to train, s2 to val, s3, s4 to test: s3 and s4 are never trained on."""
    root, params = prepare_tiny_pipeline(tmp_path, *TINY, "cv.folds=2")
    plan = plan_cv(params, root / "scenes.json", root / "tiles", root / "cv")
    assert plan["tested"] == ["s3", "s4"] and plan["scenes"] == ["s0", "s1", "s2", "s3", "s4"]
    for training in plan["trainings"]:
        members = json.loads((Path(training["dir"]) / "split.json").read_text())["members"]
        assert sorted(members["train"]) == ["s0", "s1"] and sorted(members["val"]) == ["s2"]
        assert len(members["test"]) == 1
    with pytest.raises(TilepipeError, match="cv.folds=3 but only 2 scene"):
        plan_cv(tiny_params(root, *TINY, "cv.folds=3"), root / "scenes.json", root / "tiles", root / "cv")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six unpinned 96 x 80 px scenes, ingested, tiled and split."""
    root = tmp_path_factory.mktemp("cv")
    prepare_tiny_pipeline(root, *TINY, splits=("",) * 6)
    return root


def cv_cli(root: Path, *args: str) -> int:
    sets = [x for o in [*tiny_overrides(root), *TINY] for x in ("--set", o)]
    paths = ["--scenes", str(root / "scenes.json"), "--tiles", str(root / "tiles")]
    paths += ["--out", str(root / "cv"), "--metrics", str(root / "metrics" / "cv.json")]
    return cli.main(["cv", "--params", str(ROOT / "params.yaml"), *sets, *paths, *args])


@pytest.fixture(scope="module")
def cv_run(workspace: Path) -> dict:
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workspace)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace / 'mlflow.db'}")
        assert cv_cli(workspace, "--folds", "3") == 0
    return json.loads((workspace / "metrics" / "cv.json").read_text())


def test_cv_tests_every_scene_once_and_summarises_the_folds(cv_run: dict) -> None:
    assert cv_run["folds"] == 3 and cv_run["scenes"] == 6 and cv_run["epochs"] == 1
    tested = [s for f in cv_run["per_fold"] for s in f["test"]]
    assert sorted(tested) == [f"s{i}" for i in range(6)] == cv_run["tested"] and cv_run["not_tested"] == []
    for fold in cv_run["per_fold"]:
        assert not set(fold["test"]) & {*fold["train"], *fold["val"]}
        assert fold["test_tiles"] == 30 * len(fold["test"])  # 6 x 5 tiles of 16 px per scene, all labelled
    for key in ("accuracy", "macro_f1", "miou"):
        values = [f[key] for f in cv_run["per_fold"]]
        stats = cv_run["summary"][key]
        assert stats["n"] == 3 and stats["mean"] == pytest.approx(np.mean(values), abs=1e-4)
        assert stats["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-4)
        half = 4.302653 * np.std(values, ddof=1) / np.sqrt(3)  # Student t, 2 degrees of freedom
        assert stats["ci"] == pytest.approx([np.mean(values) - half, np.mean(values) + half], abs=2e-4)
        low, high = cv_run["pooled"][f"{key}_ci"]  # every scene scored by the fold that held it out
        assert low <= cv_run["pooled"][key] <= high
    # the README's results table reads cv.json as written (tilepipe/results.py)
    epochs = cv_run["epochs"]
    want = f"tiles, 3-fold scene cross-validation (6 scenes, {epochs} epochs): mean [95 % CI]"
    assert cv_label(cv_run) == want


def test_cv_logs_a_parent_run_with_one_child_per_fold(cv_run: dict, workspace: Path) -> None:
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tilepipe").experiment_id])
    parent = next(r for r in runs if r.info.run_id == cv_run["run_id"])
    assert parent.data.tags["cv"] == "scene-grouped" and parent.data.tags["cv.folds"] == "3"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == cv_run["run_id"]]
    by_fold = {int(r.data.tags["cv.fold"]): r for r in children}
    assert sorted(by_fold) == [1, 2, 3]
    for fold in cv_run["per_fold"]:
        child = by_fold[fold["fold"]]
        assert child.info.run_id == fold["run_id"] and child.info.run_name == f"cv-fold{fold['fold']}"
        assert child.data.tags["cv.test_scenes"] == " ".join(fold["test"])
        assert child.data.metrics["test_macro_f1"] == pytest.approx(fold["macro_f1"], abs=1e-4)
        assert child.data.params["train.epochs"] == "1", "a fold trains with train.*, as tilepipe train"
    history = client.get_metric_history(cv_run["run_id"], "cv_macro_f1")
    assert [m.step for m in history] == [1, 2, 3]
    assert parent.data.metrics["cv_macro_f1_mean"] == pytest.approx(cv_run["summary"]["macro_f1"]["mean"])
    assert [a.path for a in client.list_artifacts(cv_run["run_id"], "cv")] == ["cv/cv.json"]


def test_cv_flow_repeats_the_cli_numbers(cv_run: dict, workspace: Path, prefect_api: str) -> None:
    from tilepipe.flows.cv import cv

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workspace)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace / 'mlflow-flow.db'}")
        state = cv(
            params_path=str(ROOT / "params.yaml"),
            overrides=[*tiny_overrides(workspace), *TINY, "cv.folds=3"],
            scenes=str(workspace / "scenes.json"),
            tiles=str(workspace / "tiles"),
            out=str(workspace / "flow-cv"),
            metrics=str(workspace / "flow-cv.json"),
            return_state=True,
        )
    assert state.is_completed(), state.message
    again = json.loads((workspace / "flow-cv.json").read_text())
    keys = ("fold", "test", "val", "train", "accuracy", "macro_f1", "miou")
    for mine, first in zip(again["per_fold"], cv_run["per_fold"], strict=True):
        assert {k: mine[k] for k in keys} == {k: first[k] for k in keys}


def test_bad_folds_are_one_line(workspace: Path, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert cv_cli(workspace, "--folds", "1") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tilepipe cv: error: --folds: cv.folds:")
    sets = [x for o in [*tiny_overrides(workspace), *TINY] for x in ("--set", o)]
    assert cli.main(["cv", "--params", str(ROOT / "params.yaml"), *sets]) == 1  # here: no ingest, no tiles
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["tilepipe cv: error: data/ingest/scenes.json: not found; run `dvc repro ingest` "
                   "(or `tilepipe ingest`) first"]  # fmt: skip
    assert not (tmp_path / "reports").exists() and not (tmp_path / "metrics").exists(), "nothing written"
