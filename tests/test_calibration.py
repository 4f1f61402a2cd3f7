"""Calibrated confidence: the temperature fit, ECE, training's calibration and predict's confidence band."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from tests.conftest import (
    CLASSES,
    SEG,
    TRAIN,
    prepare_tiny_pipeline,
)
from tilepipe.fsutil import file_sha256
from tilepipe.ml import epochs
from tilepipe.ml.calibration import (
    T_RANGE,
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


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def test_an_old_model_without_a_temperature_still_loads(tmp_path):
    model = small_cnn()
    old_meta = {k: v for k, v in cls_meta().to_dict().items() if k != "temperature"}
    with open(tmp_path / "model.pt", "wb") as fh:  # as tilepipe saved models before calibration
        torch.save({"state_dict": model.state_dict(), "meta": old_meta}, fh)
    loaded, meta = load_model(tmp_path / "model.pt")
    assert meta.temperature == 1.0 and calibrated(loaded, meta) is loaded


def test_training_fits_a_temperature_and_evaluate_reports_ece_before_and_after(tmp_path, capsys, monkeypatch):
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
