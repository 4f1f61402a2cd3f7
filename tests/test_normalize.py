"""bands.normalize: range gives today's results; the other modes train, predict and evaluate with the
model's statistics (scene: each scene's own); photometric augmentation is seeded like the flips."""

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window

from tests.conftest import SEG, TRAIN, prepare_tiny_pipeline, tiny_params, write_raster
from tilepipe.geo.raster_io import scale_to_unit
from tilepipe.mapping.predict import predict_scene
from tilepipe.mapping.scene import open_scene
from tilepipe.ml.checkpoint import ModelMeta, load_model
from tilepipe.ml.dataset import (
    TileBatches,
    dihedral,
    dihedral_ops,
    jitter_draws,
    jittered,
    open_stores,
    select_tiles,
    split_members,
)
from tilepipe.ml.epochs import calibrate_saved_model
from tilepipe.ml.evaluation import held_out_batches, score_test_tiles
from tilepipe.ml.normalize import Normalization, normalize
from tilepipe.ml.training import load_training_data, train
from tilepipe.stages.analyze import analyze
from tilepipe.stages.ingest import ingest
from tilepipe.stages.tile import tile

# Made with the code before bands.normalize existed (commit 1e5e6dd), 1 torch thread, torch 2.13.0, on
# the shared 2-core development machine (CPU_MADE_ON): the weights, the map and the test loss of a
# tiny training. Other CPUs sum floats in another order (docs/tracking.md), so the test runs only on
# that CPU model; there any change to what the range path computes shows.
CPU_MADE_ON = "AMD EPYC"
BEFORE = {
    "classification": (
        "b84925793e79b9949ac347d1b7097eec97559de893340383f6af54677418ffec",
        "5843d3151741f001be915c93d3dc077da1146ab65c59e61143763ad8ae6f3a18",
        89.796903,
    ),
    "segmentation": (
        "b13889d8107cf25a15228c8472c688326af377f9605521ce8dbc5846d6215ec2",
        "8f0d947ce214330fa207e6e20d6c5aba3c53e70f3fcb9b09eae9676d70673b1f",
        56.911622,
    ),
}
RGB = ["red", "green", "blue"]


def _digest(model) -> str:
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _analyzed(tmp_path, *overrides):
    tmp_path, params = prepare_tiny_pipeline(tmp_path, *overrides)
    analyze(params, *_paths(tmp_path)[:2], tmp_path / "split.json", tmp_path / "stats.json")
    return tmp_path, params


def _paths(tmp_path):
    return tmp_path / "scenes.json", tmp_path / "tiles"


def _train(params, tmp_path, stats: bool = True):
    stats_json = tmp_path / "stats.json" if stats else None
    train(params, tmp_path / "tiles", tmp_path / "split.json", tmp_path / "models", stats_json=stats_json)
    return load_model(tmp_path / "models" / "model.pt")


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


@pytest.mark.skipif(_cpu() != CPU_MADE_ON, reason=f"the digests were made on an {CPU_MADE_ON}")
@pytest.mark.parametrize("task", [TRAIN, SEG], ids=["classification", "segmentation"])
def test_range_gives_the_weights_maps_and_scores_of_before(tmp_path, task, one_thread):
    tmp_path, params = _analyzed(tmp_path, *task)
    model, meta = _train(params, tmp_path)
    weights, map_digest, loss = BEFORE[meta.task]
    assert _digest(model) == weights, "bands.normalize: range must train exactly as before"
    # the temperature (calibration, added since) rescales the probability bands: the map of before is T = 1's
    uncalibrated = replace(meta, temperature=1.0)
    predict_scene(params, model, uncalibrated, tmp_path / "s3.tif", tmp_path / "map.tif", probabilities=True)
    with rasterio.open(tmp_path / "map.tif") as src:
        assert hashlib.sha256(src.read().tobytes()).hexdigest() == map_digest
    scores = score_test_tiles(params, model, meta, tmp_path / "tiles", tmp_path / "split.json")
    assert round(scores.total_loss, 6) == loss
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert meta.norm == Normalization("range", *(stats[k] for k in ("mean", "std", "p2", "p98")))


def _uint16_scene(tmp_path, source):
    """``source`` (uint8 RGB) as a 4-band uint16 scene, bands in another order, and its unit RGB."""
    with rasterio.open(source) as src:
        rgb, transform, crs = src.read(), src.transform, src.crs
    wide = np.concatenate([rgb[::-1], rgb[:1]]).astype(np.uint16) * 37  # blue, green, red, nir
    names = ["blue", "green", "red", "nir"]
    path = write_raster(tmp_path / "u16.tif", wide, crs.to_string(), transform, 0, names)
    return path, scale_to_unit(wide[[2, 1, 0]], "uint16", {"uint16": (0, 10000)})


def test_standardize_runs_end_to_end_with_the_models_statistics(tmp_path):
    tmp_path, params = _analyzed(tmp_path, *TRAIN, "train.epochs=2", "bands.normalize=standardize")
    model, meta = _train(params, tmp_path)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert meta.norm.mode == "standardize"
    assert meta.norm.mean == stats["mean"] and meta.norm.std == stats["std"]
    np.testing.assert_allclose(meta.mean, 0, atol=0.05)  # the built-in layer sees standardised tiles
    np.testing.assert_allclose(meta.std, 1, atol=0.05)
    path, unit = _uint16_scene(tmp_path, tmp_path / "s3.tif")  # another dtype and band set: accepted
    with open_scene(path, meta) as scene:
        got, _ = scene.read(Window(0, 0, 96, 80))
    want = (unit - np.float32(stats["mean"])[:, None, None]) / np.float32(stats["std"])[:, None, None]
    np.testing.assert_allclose(got, want, atol=1e-5)  # the model's figures, not the scene's own
    assert abs(float(got.mean())) > 0.05, "the scene's own figures would centre it on 0"
    summary = predict_scene(params, model, meta, path, tmp_path / "u16_map.tif")
    assert sum(summary["class_pixels"].values()) > 0
    members = split_members(tmp_path / "split.json", "test")
    stores = open_stores(tmp_path / "tiles", sorted(members))
    ref = select_tiles(stores, members, "classification", 0.0)
    x, _ = held_out_batches(stores, ref, members, meta)[(0, 0, [0, 1, 2])]
    plain, _ = TileBatches(stores, ref, "classification").gather(np.arange(3))
    np.testing.assert_allclose(x.numpy(), normalize(plain, meta.norm), atol=0)


def _raster_figures(path):
    with rasterio.open(path) as src:
        image = src.read()
    unit = scale_to_unit(image, "uint8", {"uint8": (0, 255)})[:, (image != 0).all(axis=0)].astype(np.float64)
    return unit.mean(axis=1), unit.std(axis=1)


def test_scene_normalisation_uses_each_scenes_own_statistics(tmp_path):
    tmp_path, params = _analyzed(tmp_path, *TRAIN, "train.epochs=1", "bands.normalize=scene")
    with rasterio.open(tmp_path / "s2.tif", "r+") as src:  # the val scene, darker: its own figures differ
        src.write((src.read() // 2 + 1).astype(np.uint8))
    ingest(params, tmp_path / "catalog.csv", tmp_path / "scenes.json")
    tile(params, *_paths(tmp_path))
    stats = json.loads((tmp_path / "stats.json").read_text())
    data = load_training_data(params, tmp_path / "tiles", tmp_path / "split.json", tmp_path / "stats.json")
    for number, scene_id in enumerate(["s0", "s1"]):
        np.testing.assert_allclose(data.inputs.scenes["train"][number], [stats["scenes"][scene_id]["mean"],
                                   stats["scenes"][scene_id]["std"]], rtol=1e-6)  # fmt: skip
    np.testing.assert_allclose(data.inputs.scenes["val"][0], _raster_figures(tmp_path / "s2.tif"), atol=1e-6)
    model, meta = _train(params, tmp_path)
    assert meta.norm.mode == "scene"
    mean, std = _raster_figures(tmp_path / "s3.tif")
    with open_scene(tmp_path / "s3.tif", meta) as scene:
        got, _ = scene.read(Window(0, 0, 96, 80))
        unit, _ = scene.unit(Window(0, 0, 96, 80))
    np.testing.assert_allclose(got, (unit - mean[:, None, None]) / std[:, None, None], atol=1e-5)
    members = split_members(tmp_path / "split.json", "test")
    stores = open_stores(tmp_path / "tiles", sorted(members))
    batches = held_out_batches(stores, select_tiles(stores, members, "classification", 0.0), members, meta)
    np.testing.assert_allclose(batches.scenes[0], [mean, std], atol=1e-6)  # s3, from its own tiles
    predict_scene(params, model, meta, tmp_path / "s3.tif", tmp_path / "map.tif")
    # the temperature was fitted on the val tiles as the model takes them: each val scene's own figures
    ref, copy = data.refs["calibration"], tmp_path / "copy.pt"
    shutil.copy(tmp_path / "models" / "model.pt", copy)
    fitted = calibrate_saved_model(params, data.stores, ref, copy, data.inputs.scenes["val"])["temperature"]
    assert fitted == round(meta.temperature, 6) and fitted != 1.0
    with pytest.raises(ValueError, match="needs the scene's statistics"):
        calibrate_saved_model(params, data.stores, ref, copy)


def test_percentile_stretches_the_training_range_onto_0_1(tmp_path):
    norm = Normalization("percentile", [0.5] * 2, [0.1] * 2, [0.2, 0.4], [0.6, 0.8])
    image = np.array([0.0, 0.2, 0.4, 0.6, 1.0], np.float32)[None, None, :].repeat(2, axis=0)
    want = [[0, 0, 0.5, 1, 1], [0, 0, 0, 0.5, 1]]
    np.testing.assert_allclose(normalize(image, norm)[:, 0], want, atol=1e-6)
    assert normalize(image, Normalization()) is image, "range leaves the pixels as they are"
    with pytest.raises(ValueError, match="needs the training tiles' statistics"):
        Normalization.from_stats("percentile", None)
    tmp_path, params = prepare_tiny_pipeline(tmp_path, *TRAIN, "train.epochs=1", "bands.normalize=percentile")
    _, meta = _train(params, tmp_path, stats=False)  # no statistics file: training computes them
    assert meta.norm.mode == "percentile"
    assert all(a < b for a, b in zip(meta.norm.p2, meta.norm.p98, strict=True))


def test_photometric_jitter_is_seeded_per_tile_and_epoch_and_the_same_on_every_rank(prepared):
    tmp_path, _ = prepared
    members = split_members(tmp_path / "split.json", "train")
    stores = open_stores(tmp_path / "tiles", sorted(members))
    for task in ("classification", "segmentation"):
        ref = select_tiles(stores, members, task, 0.5)
        photo, both = (TileBatches(stores, ref, task, augment=a) for a in ("photometric", "both"))
        positions = np.random.default_rng(2).permutation(len(ref.tile))[:9]
        plain, labels = photo.gather(positions)
        draws = jitter_draws(5, 3, positions, 3)
        x, y = photo[(5, 3, positions.tolist())]
        np.testing.assert_array_equal(x.numpy(), jittered(plain, draws))
        assert not np.array_equal(x.numpy(), plain) and 0 <= float(x.min()) and float(x.max()) <= 1
        torch.testing.assert_close(photo[(5, 3, positions.tolist())][0], x, rtol=0, atol=0)  # deterministic
        assert not torch.equal(photo[(5, 4, positions.tolist())][0], x), "another epoch, another jitter"
        turned, turned_labels = dihedral(plain, labels, dihedral_ops(5, 3, positions))
        xb, yb = both[(5, 3, positions.tolist())]
        np.testing.assert_array_equal(xb.numpy(), jittered(turned, draws))
        if task == "segmentation":  # the jitter leaves labels alone; the turns move them with the pixels
            assert np.array_equal(y.numpy() == -100, labels == 255)
            assert np.array_equal(yb.numpy() == -100, turned_labels == 255)
        for rows in ([0, 2, 4, 6, 8], [1, 3, 5, 7], []):  # a rank's share: its rows of the whole batch
            xr, _ = both[(5, 3, positions.tolist(), rows)]
            torch.testing.assert_close(xr, xb[rows], rtol=0, atol=0)
    gain, gamma, offset = draws[:, 0], draws[:, 1], draws[:, 2]
    assert 0.8 <= gain.min() and gain.max() <= 1.25 and 0.8 <= gamma.min() and abs(offset).max() <= 0.05
    assert len({tuple(d) for d in draws[:, 0].tolist()}) == len(positions), "each tile its own draw"


def test_augment_takes_the_old_booleans(tmp_path):
    assert tiny_params(tmp_path, "train.augment=true").train.augment == "geometric"
    assert tiny_params(tmp_path, "train.augment=false").train.augment == "none"
    assert tiny_params(tmp_path).train.augment == "geometric"
    from tilepipe.errors import TilepipeError

    with pytest.raises(TilepipeError, match="train.augment"):
        tiny_params(tmp_path, "train.augment=colour")
    old = {"task": "classification", "model": "small_cnn", "width": 4, "bands": RGB, "scale": {},
           "classes": ["a", "b"], "tile_size": 16}  # fmt: skip
    meta = ModelMeta.from_dict(old)
    assert meta.norm == Normalization() and meta.gsd_range is None, "models saved before: range, GSD unknown"
