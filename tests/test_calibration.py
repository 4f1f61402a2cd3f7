"""Calibrated confidence: the temperature fit, ECE, training's calibration and predict's confidence band."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import rasterio
import torch

from tests.conftest import (
    CLASSES,
    ROOT,
    SEG,
    TRAIN,
    prepare_tiny_pipeline,
    tiny_overrides,
    tiny_params,
    write_raster,
)
from tilepipe import cli
from tilepipe.fsutil import file_sha256
from tilepipe.mapping.blend import NODATA
from tilepipe.mapping.predict import predict_scene
from tilepipe.ml import epochs
from tilepipe.ml.calibration import (
    T_RANGE,
    Calibrated,
    CalibrationBins,
    at_range_end,
    calibrated,
    fit_temperature,
    nll,
)
from tilepipe.ml.checkpoint import ModelMeta, load_model, save_meta, save_model
from tilepipe.ml.dataset import open_stores, select_tiles, split_members
from tilepipe.ml.evaluation import evaluate
from tilepipe.ml.models import Normalized, SmallCNN, UNet
from tilepipe.ml.training import train

RGB = ["red", "green", "blue"]
SCALE = {"uint8": [0, 255], "uint16": [0, 10000]}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def cls_meta(**extra) -> ModelMeta:
    fields = {"task": "classification", "model": "small_cnn", "width": 4, "bands": RGB, "scale": SCALE}
    return ModelMeta(
        **{**fields, "classes": CLASSES, "tile_size": 16, "mean": [0.5] * 3, "std": [0.3] * 3, **extra}
    )


def small_cnn() -> Normalized:
    torch.manual_seed(0)
    return Normalized(SmallCNN(3, len(CLASSES), 4), [0.5] * 3, [0.3] * 3).eval()


def labels_at(logits: torch.Tensor, temperature: float, seed: int) -> torch.Tensor:
    """Labels drawn from softmax(logits / temperature): the model is calibrated at that temperature."""
    generator = torch.Generator().manual_seed(seed)
    return torch.multinomial(torch.softmax(logits / temperature, dim=1), 1, generator=generator)[:, 0]


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_the_fit_recovers_a_known_temperature(true_t):
    logits = torch.randn(20000, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    targets = labels_at(logits, true_t, seed=2)
    fitted = fit_temperature(logits, targets)
    assert abs(fitted / true_t - 1) < 0.05, fitted
    assert fit_temperature(logits, targets) == fitted, "deterministic"
    best = nll(logits, targets, fitted)  # the fit is the NLL's minimum, not merely near true_t
    assert best <= nll(logits, targets, fitted * 1.01) and best <= nll(logits, targets, fitted / 1.01)
    assert best < nll(logits, targets, 1.0)


def test_a_model_no_better_than_chance_ends_at_the_top_of_the_range():
    logits = torch.randn(5000, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 3
    targets = torch.randint(0, 5, (5000,), generator=torch.Generator().manual_seed(8))  # unrelated
    fitted = fit_temperature(logits, targets)
    assert fitted == pytest.approx(T_RANGE[1], rel=1e-3) and at_range_end(fitted)
    assert not at_range_end(1.0)


def test_ece_of_a_hand_computed_example():
    bins = CalibrationBins()  # 15 bins of width 1/15
    # bin 13 = (0.867, 0.933]: two at 0.9, one right -> |0.5 - 0.9| = 0.4, weight 2/6
    # bin  9 = (0.6, 0.667]: three at 0.62, two right -> |0.667 - 0.62| = 0.0467, weight 3/6
    # bin 14 = (0.933, 1]: one at 1.0, right -> 0
    bins.add(np.array([0.9, 0.9, 0.62]), np.array([1, 0, 1]))
    bins.add(np.array([0.62, 0.62, 1.0]), np.array([1, 0, 1]))  # batches add up
    expected = (2 * 0.4 + 3 * abs(2 / 3 - 0.62) + 0) / 6
    assert bins.ece() == pytest.approx(expected, abs=1e-12)
    assert bins.count.tolist() == [0] * 9 + [3, 0, 0, 0, 2, 1]
    assert CalibrationBins().ece() == 0.0
    edges = CalibrationBins()  # a bin holds its upper edge: 0.6 = 9/15 is in (8/15, 9/15]
    edges.add(np.array([0.6, 1.0, 0.0]), np.array([1, 1, 0]))
    assert edges.count[8] == edges.count[14] == edges.count[0] == 1

    # From logits: a segmentation batch (batch, classes, h, w) is its pixels; unlabelled ones skipped.
    logits = torch.randn(2, 5, 4, 4, generator=torch.Generator().manual_seed(3))
    targets = torch.randint(0, 5, (2, 4, 4), generator=torch.Generator().manual_seed(4))
    targets[0, 0, :2] = -100
    pixels = CalibrationBins()
    pixels.add_logits(logits, targets, temperature=2.0)
    probs = torch.softmax(logits / 2.0, dim=1).movedim(1, -1)[targets >= 0]
    by_hand = CalibrationBins()
    by_hand.add(probs.max(dim=1).values.numpy(), (probs.argmax(dim=1) == targets[targets >= 0]).numpy())
    assert pixels.count.sum() == 30 and pixels.ece() == pytest.approx(by_hand.ece(), abs=1e-9)


def test_an_old_model_without_a_temperature_still_loads_and_predicts(tmp_path):
    model = small_cnn()
    old_meta = {k: v for k, v in cls_meta().to_dict().items() if k != "temperature"}
    with open(tmp_path / "model.pt", "wb") as fh:  # as tilepipe saved models before calibration
        torch.save({"state_dict": model.state_dict(), "meta": old_meta}, fh)
    loaded, meta = load_model(tmp_path / "model.pt")
    assert meta.temperature == 1.0 and calibrated(loaded, meta) is loaded
    image = np.random.default_rng(0).integers(1, 256, (3, 40, 48), dtype=np.uint8)
    scene = write_raster(tmp_path / "s.tif", image, descriptions=RGB)
    params = tiny_params(tmp_path)
    summary = predict_scene(params, loaded, meta, scene, tmp_path / "map.tif", confidence=True)
    assert summary["temperature"] == 1.0 and 0.2 <= summary["mean_confidence"] <= 1.0


def unet_on(image: np.ndarray) -> Normalized:
    """A seeded U-Net whose batch norm is set on the scene, so its logits are unit-sized, not ~1e-3."""
    torch.manual_seed(0)
    model = Normalized(UNet(3, len(CLASSES), 4), [0.5] * 3, [0.3] * 3)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        model.train()(torch.from_numpy(image.astype(np.float32) / 255)[None])
    return model.eval()


def maps_at(tmp_path, params, model, meta, scene, temperatures) -> tuple[dict, dict]:
    """Each temperature's map (all bands, --probabilities and --confidence) and summary."""
    bands, summaries = {}, {}
    for t in temperatures:
        out = tmp_path / f"map-{meta.task}-{t}.tif"
        summaries[t] = predict_scene(
            params, model, replace(meta, temperature=t), scene, out, probabilities=True, confidence=True
        )
        with rasterio.open(out) as src:
            bands[t] = src.read()
            assert src.descriptions == ("class", *CLASSES, "confidence")
            assert float(src.tags()["TILEPIPE_TEMPERATURE"]) == t
    return bands, summaries


def test_a_temperature_changes_the_probabilities_never_a_pixel_maps_classes(tmp_path):
    image = np.random.default_rng(5).integers(1, 256, (3, 48, 56), dtype=np.uint8)
    image[:, :16, :16] = 0
    scene = write_raster(tmp_path / "s.tif", image, nodata=0, descriptions=RGB)
    params = tiny_params(tmp_path, "predict.window=64", "predict.margin=24")  # one window: no blending
    meta = replace(cls_meta(), task="segmentation", model="unet")
    bands, summaries = maps_at(tmp_path, params, unet_on(image), meta, scene, (1.0, 0.25))
    np.testing.assert_array_equal(bands[1.0][0], bands[0.25][0])  # the class band
    valid = bands[1.0][0] != NODATA
    assert (~valid).sum() == 16 * 16
    assert not np.array_equal(bands[1.0][1:], bands[0.25][1:])  # the probabilities and confidence
    assert summaries[0.25]["mean_confidence"] > summaries[1.0]["mean_confidence"]  # 0.25: sharper
    for t, data in bands.items():
        confidence = data[-1]
        assert (confidence[~valid] == NODATA).all() and confidence[valid].max() <= 254
        assert (confidence[valid] == data[1:-1].max(axis=0)[valid]).all()  # the top class's probability
        assert summaries[t]["mean_confidence"] == pytest.approx(confidence[valid].mean() / 255, abs=1 / 255)

    # The wrapper every map applies: logits / T, once.
    x = torch.rand(4, 3, 16, 16)
    model = small_cnn()
    wrapped = calibrated(model, cls_meta(temperature=2.0))
    assert isinstance(wrapped, Calibrated) and calibrated(wrapped, cls_meta(temperature=2.0)) is wrapped
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), model(x) / 2.0)


def test_a_classifier_map_averages_calibrated_windows(tmp_path):
    """A cell's class is the argmax of its windows' mean softmax: T can move a cell whose windows disagree."""
    image = np.random.default_rng(6).integers(1, 256, (3, 64, 80), dtype=np.uint8)
    scene = write_raster(tmp_path / "s.tif", image, descriptions=RGB)
    params = tiny_params(tmp_path)
    bands, summaries = maps_at(tmp_path, params, small_cnn(), cls_meta(), scene, (1.0, 0.25))
    same = (bands[1.0][0] == bands[0.25][0]).mean()
    assert same >= 0.8, same
    assert not np.array_equal(bands[1.0][1:], bands[0.25][1:])
    for data in bands.values():
        assert (data[-1] == data[1:-1].max(axis=0)).all()


def test_training_fits_a_temperature_evaluate_reports_ece_predict_maps_confidence(
    tmp_path, capsys, monkeypatch
):
    tmp_path, params = prepare_tiny_pipeline(tmp_path, *TRAIN, "train.min_purity=0.9")  # some tiles mixed
    monkeypatch.chdir(tmp_path)
    summary = train(params, tmp_path / "tiles", tmp_path / "split.json", tmp_path / "models")
    _, meta = load_model(tmp_path / "models" / "model.pt")
    fitted = summary["calibration"]
    assert meta.temperature != 1.0 and 0.05 <= meta.temperature <= 20
    assert fitted["temperature"] == round(meta.temperature, 6)
    assert fitted["val_nll"] <= fitted["val_nll_uncalibrated"]
    members = split_members(tmp_path / "split.json", "val")
    every_val_tile = select_tiles(
        open_stores(tmp_path / "tiles", sorted(members)), members, "classification", 0.0
    )
    assert fitted["samples"] == len(every_val_tile.tile) > summary["val_tiles"], "mixed val tiles too"
    assert json.loads((tmp_path / "models" / "train.json").read_text())["calibration"] == fitted

    args = (params, tmp_path / "models", tmp_path / "tiles", tmp_path / "split.json")
    metrics = evaluate(*args, tmp_path / "metrics")
    saved = json.loads((tmp_path / "metrics" / "metrics.json").read_text())
    assert saved["temperature"] == round(meta.temperature, 4)
    assert 0 <= saved["ece"] <= 1 and 0 <= saved["ece_uncalibrated"] <= 1
    assert saved["ece"] != saved["ece_uncalibrated"]
    assert "15-bin ECE" in (tmp_path / "metrics" / "report.txt").read_text()

    # tilepipe predict --confidence: one more band; the class band is the one without it.
    sets = [x for o in [*tiny_overrides(tmp_path), *TRAIN] for x in ("--set", o)]
    base = ["predict", str(tmp_path / "s3.tif"), "--model", str(tmp_path / "models")]
    base += ["--params", str(ROOT / "params.yaml")]
    for name, flags in (("plain", []), ("confident", ["--confidence"])):
        base[2:2] = [str(tmp_path / f"{name}.tif")]
        assert cli.main([*base, *sets, *flags]) == 0
        del base[2]
    printed = capsys.readouterr().out
    with rasterio.open(tmp_path / "plain.tif") as plain, rasterio.open(tmp_path / "confident.tif") as out:
        assert plain.count == 1 and out.count == 2 and out.descriptions == ("class", "confidence")
        assert out.dtypes == ("uint8", "uint8") and out.tags(2)["PROBABILITY_SCALE"].startswith("top-class")
        np.testing.assert_array_equal(plain.read(1), out.read(1))
        confidence, mapped = out.read(2), out.read(1) != NODATA
        mean = float(out.tags()["TILEPIPE_MEAN_CONFIDENCE"])
    assert confidence[mapped].min() >= 255 // len(CLASSES) and confidence[mapped].max() <= 254
    assert mean == pytest.approx(confidence[mapped].mean() / 255, abs=1 / 255)
    assert f"mean confidence {mean:.3f}" in printed
    item = json.loads((tmp_path / "confident.json").read_text())
    assert item["properties"]["tilepipe:mean_confidence"] == mean
    assert item["properties"]["tilepipe:temperature"] == meta.temperature
    assert "band 2: top-class probability" in item["assets"]["map"]["description"]

    save_meta(tmp_path / "models" / "model.pt", replace(meta, temperature=1.0))  # the same weights, T = 1
    again = evaluate(*args, tmp_path / "metrics-t1")
    assert again["ece"] == again["ece_uncalibrated"] == metrics["ece_uncalibrated"]
    assert again["accuracy"] == metrics["accuracy"] and again["loss"] == metrics["loss"]


def test_segmentation_calibrates_on_sampled_val_pixels_again_and_again_alike(tmp_path, monkeypatch):
    tmp_path, params = prepare_tiny_pipeline(tmp_path, *SEG)
    members = split_members(tmp_path / "split.json", "val")
    stores = open_stores(tmp_path / "tiles", sorted(members))
    ref = select_tiles(stores, members, "segmentation", 0.0)
    torch.manual_seed(0)
    model = Normalized(UNet(3, len(CLASSES), 4), [0.5] * 3, [0.3] * 3)
    meta = replace(cls_meta(), task="segmentation", model="unet")
    path = tmp_path / "model.pt"
    save_model(path, model, meta)
    monkeypatch.setattr(epochs, "CALIBRATION_SAMPLES", 1000)  # far fewer than the val pixels
    pixels = len(ref.tile) * 16 * 16
    first = epochs.calibrate_saved_model(params, stores, ref, path)
    assert pixels > 2000 and 500 <= first["samples"] <= 1000  # every ceil(pixels / 1000)-th labelled pixel
    once = file_sha256(path)
    _, saved = load_model(path)
    assert saved.temperature == pytest.approx(first["temperature"], rel=1e-6) and saved.temperature != 1.0
    assert first["val_nll"] <= first["val_nll_uncalibrated"]
    # After a kill between the fit and the summary, the fit runs again: from the raw logits, to the same file.
    assert epochs.calibrate_saved_model(params, stores, ref, path) == first and file_sha256(path) == once
    reloaded, _ = load_model(path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), "weights untouched"
    assert math.isfinite(first["val_nll"])
