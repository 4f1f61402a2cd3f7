import json

import numpy as np
import pytest
import rasterio
import torch

from tests.conftest import CLASSES, ROOT, SEG, prepare_tiny_pipeline, tiny_overrides
from tilepipe import cli
from tilepipe.mapping.predict import predict_scene
from tilepipe.mapping.scoring import held_out_scenes
from tilepipe.ml.checkpoint import load_model
from tilepipe.ml.training import train
from tilepipe.stages.evaluate import evaluate
from tilepipe.stages.predict import predict_held_out
from tilepipe.tracking.models import resolve_model

SEG_MAPS = [*SEG, "predict.window=64", "predict.margin=24"]  # the resume test is in test_train.py


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture
def prepared(tmp_path):
    return prepare_tiny_pipeline(tmp_path, *SEG_MAPS)


def test_segmentation_trains_evaluates_and_maps_whole_scenes(prepared, monkeypatch):
    tmp_path, params = prepared
    monkeypatch.chdir(tmp_path)  # scene records hold paths relative to where ingest ran
    summary = train(params, tmp_path / "tiles", tmp_path / "split.json", tmp_path / "models")
    assert summary["epochs_run"] == 3 and "val_miou" in summary["best"]
    assert sum(summary["train_class_counts"]) > summary["train_tiles"], "counts are pixels, not tiles"
    model, meta = load_model(tmp_path / "models" / "model.pt")
    assert meta.task == "segmentation" and meta.model == "unet"

    maps = tmp_path / "predictions"
    predict_held_out(
        params, tmp_path / "models" / "model.pt", tmp_path / "scenes.json", tmp_path / "split.json", maps
    )
    metrics = evaluate(
        params, tmp_path / "models", tmp_path / "tiles", tmp_path / "split.json", tmp_path / "metrics",
        maps, tmp_path / "scenes.json",
    )  # fmt: skip
    saved = json.loads((tmp_path / "metrics" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert set(saved["per_class"]) == set(CLASSES) and all("iou" in c for c in saved["per_class"].values())
    trained = json.loads((tmp_path / "models" / "train.json").read_text())["train_class_counts"]
    assert [saved["per_class"][c]["train_examples"] for c in CLASSES] == trained  # labelled pixels
    assert "trained on" in (tmp_path / "metrics" / "report.txt").read_text()
    assert sum(c["support"] for c in saved["per_class"].values()) == 2 * 30 * 16 * 16, (
        "every test pixel scored"
    )
    assert np.isclose(saved["miou"], np.mean([c["iou"] for c in saved["per_class"].values()]), atol=1e-3)
    assert saved["miou"] > saved["baseline_miou"] and saved["accuracy"] > saved["baseline_accuracy"]

    records = held_out_scenes(tmp_path / "scenes.json", tmp_path / "split.json")
    assert [r.scene_id for r in records] == ["s3", "s4"]
    result = json.loads((tmp_path / "metrics" / "scenes" / "scene_metrics.json").read_text())
    assert saved["map_miou"] == result["overall"]["miou"] and saved["map_scenes"] == 2
    assert result["unit"] == "pixel" and set(result["scenes"]) == {"s3", "s4"}
    assert result["overall"]["scored"] == 2 * 96 * 80  # whole scenes, edges included
    assert result["overall"]["miou"] > saved["baseline_miou"]
    for scene_id in ("s3", "s4"):
        png = tmp_path / "metrics" / "scenes" / f"{scene_id}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    predict_scene(params, model, meta, tmp_path / "s3.tif", tmp_path / "s3_map.tif")
    with rasterio.open(tmp_path / "s3_map.tif") as out, rasterio.open(tmp_path / "s3.tif") as src:
        assert out.transform == src.transform and out.shape == src.shape
        predicted = out.read(1)
    labels = rasterio.open(tmp_path / "s3_labels.tif").read(1).astype(int) - 1
    assert np.isclose((predicted == labels).mean(), result["scenes"]["s3"]["accuracy"], atol=1e-3)


def test_segmentation_through_mlflow_champion_predict_and_pyfunc(prepared, monkeypatch, capsys):
    import mlflow.pyfunc

    tmp_path, params = prepared
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    overrides = [*tiny_overrides(tmp_path), *SEG_MAPS, "track.champion_metric=miou"]
    sets = [x for o in overrides for x in ("--set", o)]
    common = ["--params", str(ROOT / "params.yaml"), *sets]
    paths = ["--tiles", str(tmp_path / "tiles"), "--split", str(tmp_path / "split.json")]
    assert cli.main(["train", *common, *paths, "--out", str(tmp_path / "models")]) == 0
    assert (
        cli.main(
            [
                "evaluate",
                *common,
                *paths,
                "--model-dir",
                str(tmp_path / "models"),
                "--out",
                str(tmp_path / "metrics"),
            ]
        )
        == 0
    )
    assert "-> champion" in capsys.readouterr().out

    # The registry's champion maps a scene with windows larger than the training tiles.
    one_window = ["--set", "predict.window=128", "--set", "predict.margin=48"]  # clamped to the 96 x 80 scene
    assert (
        cli.main(["predict", *common, *one_window, str(tmp_path / "s3.tif"), str(tmp_path / "s3_map.tif")])
        == 0
    )
    local, _ = load_model(tmp_path / "models" / "model.pt")
    with rasterio.open(tmp_path / "s3.tif") as src, rasterio.open(tmp_path / "s3_map.tif") as out:
        x = torch.from_numpy(src.read().astype(np.float32) / 255)[None]
        with torch.no_grad():
            np.testing.assert_array_equal(out.read(1), local(x)[0].argmax(0).numpy())
    model, meta = resolve_model(f"models:/{params.track.model_name}@champion")
    assert meta.task == "segmentation"

    # Serving: (n, bands, tile, tile) float32 in [0, 1] -> per-pixel class logits.
    run = json.loads((tmp_path / "models" / "run.json").read_text())
    batch = np.random.default_rng(0).random((4, 3, 16, 16), dtype=np.float32)
    logits = np.asarray(mlflow.pyfunc.load_model(run["model_uri"]).predict(batch))
    assert logits.shape == (4, len(CLASSES), 16, 16)
    with torch.no_grad():
        np.testing.assert_allclose(logits, local(torch.from_numpy(batch)).numpy(), atol=1e-5)
