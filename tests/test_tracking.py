import json
from pathlib import Path

import torch
from mlflow import MlflowClient

from tests.conftest import ROOT, TRAIN, tiny_overrides
from tilepipe import cli
from tilepipe.ml.checkpoint import load_model, save_model


def _cli(tmp_path, command, *args, extra=()):
    sets = [x for o in [*tiny_overrides(tmp_path), *TRAIN, *extra] for x in ("--set", o)]
    return cli.main([command, "--params", str(ROOT / "params.yaml"), *sets, *args])


def _paths(tmp_path, models):
    return [
        "--tiles",
        str(tmp_path / "tiles"),
        "--split",
        str(tmp_path / "split.json"),
        "--out",
        str(tmp_path / models),
    ]


def _evaluate(tmp_path, models, *maps):
    return _cli(
        tmp_path,
        "evaluate",
        "--model-dir",
        str(tmp_path / models),
        "--tiles",
        str(tmp_path / "tiles"),
        "--split",
        str(tmp_path / "split.json"),
        "--out",
        str(tmp_path / f"metrics-{models}"),
        *maps,
    )


def test_run_has_one_point_per_epoch_and_champion_only_moves_up(prepared, monkeypatch):  # noqa: F811
    tmp_path, _ = prepared
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert _cli(tmp_path, "train", *_paths(tmp_path, "good"), extra=["train.epochs=4"]) == 0
    run = json.loads((tmp_path / "good" / "run.json").read_text())
    client = MlflowClient()
    for metric in (
        "train_loss",
        "val_loss",
        "val_accuracy",
        "val_macro_f1",
        "lr",
        "epoch_seconds",
        "tiles_per_second",
    ):
        history = client.get_metric_history(run["run_id"], metric)
        assert [m.step for m in history] == [1, 2, 3, 4], metric
    tags = client.get_run(run["run_id"]).data.tags
    assert tags["scenes_train"] == "2" and tags["scenes_test"] == "2"
    assert "git_commit" in tags
    scenes, split = str(tmp_path / "scenes.json"), str(tmp_path / "split.json")
    model_path = str(tmp_path / "good" / "model.pt")
    predict = [
        "--test-scenes",
        str(tmp_path / "maps"),
        "--model",
        model_path,
        "--scenes",
        scenes,
        "--split",
        split,
    ]
    assert _cli(tmp_path, "predict", *predict) == 0
    assert _evaluate(tmp_path, "good", "--maps", str(tmp_path / "maps"), "--scenes", scenes) == 0
    logged = [a.path for a in client.list_artifacts(run["run_id"], "evaluation/scenes")]
    test_scenes = json.loads((tmp_path / "split.json").read_text())["members"]["test"]
    assert sorted(logged) == sorted(
        [f"evaluation/scenes/{s}.png" for s in test_scenes] + ["evaluation/scenes/scene_metrics.json"]
    )
    logged_metrics = client.get_run(run["run_id"]).data.metrics
    assert logged_metrics["test_map_macro_f1"] >= 0.0
    # calibration: the temperature in the logged meta, ECE before and after among the test metrics
    logged_meta = json.loads(Path(client.download_artifacts(run["run_id"], "model_meta.json")).read_text())
    assert logged_meta["temperature"] != 1.0
    assert logged_metrics["test_temperature"] == round(logged_meta["temperature"], 4)
    assert {"test_ece", "test_ece_uncalibrated"} <= set(logged_metrics)
    champion = client.get_model_version_by_alias("tilepipe-landcover", "champion")
    assert champion.run_id == run["run_id"] or champion.tags["run_id"] == run["run_id"]
    good_score = float(champion.tags["test_macro_f1"])

    # A worse model: same training, then its head is wiped so it always predicts one rare class.
    assert _cli(tmp_path, "train", *_paths(tmp_path, "bad"), extra=["train.epochs=1"]) == 0
    model, meta = load_model(tmp_path / "bad" / "model.pt")
    with torch.no_grad():
        model.net.head.weight.zero_()
        model.net.head.bias.copy_(torch.tensor([5.0, 0, 0, 0, 0]))
    save_model(tmp_path / "bad" / "model.pt", model, meta)
    assert _evaluate(tmp_path, "bad") == 0
    bad_run = json.loads((tmp_path / "bad" / "run.json").read_text())
    versions = client.search_model_versions("name='tilepipe-landcover'")
    assert len(versions) == 2
    assert _evaluate(tmp_path, "good") == 0  # the same model evaluated again: no second version
    assert len(client.search_model_versions("name='tilepipe-landcover'")) == 2
    bad_version = next(v for v in versions if v.tags.get("run_id") == bad_run["run_id"])
    assert float(bad_version.tags["test_macro_f1"]) < good_score
    assert client.get_model_version_by_alias("tilepipe-landcover", "champion").version == champion.version
