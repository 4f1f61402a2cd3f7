"""The analyze stage: band statistics of the training tiles only, against NumPy over the same pixels."""

import json

import numpy as np
import pytest
import rasterio

from tests.conftest import ROOT, tiny_params, write_catalog, write_raster, write_scene
from tilepipe import cli
from tilepipe.geo.band_stats import HIST_BINS, PERCENTILE_ERROR, BandAccumulator
from tilepipe.geo.raster_io import scale_to_unit
from tilepipe.stages.analyze import analyze
from tilepipe.stages.ingest import ingest
from tilepipe.stages.split import split
from tilepipe.stages.tile import tile
from tilepipe.tiles import analysis

SPLITS = ("train", "train", "val", "test", "test")


def _holes(folder):
    """s0 (training): a tile wholly nodata (dropped), a patch of nodata in a kept tile, a pixel whose first
    band alone is nodata (GDAL: invalid), and valid pixels left unlabelled (they count)."""
    with rasterio.open(folder / "s0.tif", "r+") as src:
        image = src.read()
        image[:, 0:16, 0:16] = 0
        image[:, 16:20, 16:24] = 0
        image[0, 30, 30] = 0
        src.write(image)
    with rasterio.open(folder / "s0_labels.tif", "r+") as src:
        labels = src.read()
        labels[:, 40:48, :] = 0
        src.write(labels)


def _pipeline(folder, *overrides, extreme: bool = False):
    """Ingest, tile, split and analyze five tiny scenes; ``extreme``: the val and test images saturated."""
    rows = []
    for i, name in enumerate(SPLITS):
        paths = write_scene(folder, f"s{i}", seed=i)
        rows.append({"scene_id": f"s{i}", "image": paths["image"].name, "labels": paths["labels"].name,
                     "split": name})  # fmt: skip
        if extreme and name != "train":
            value = 255 if i % 2 else 1
            data = np.full((3, 80, 96), value, dtype=np.uint8)
            write_raster(paths["image"], data, nodata=0, descriptions=["red", "green", "blue"])
    _holes(folder)
    params = tiny_params(folder, *overrides)
    catalog = write_catalog(folder, rows)
    ingest(params, catalog, folder / "scenes.json")
    tile(params, folder / "scenes.json", folder / "tiles")
    split(params, folder / "scenes.json", folder / "tiles", folder / "split.json")
    paths = [folder / name for name in ("scenes.json", "tiles", "split.json", "stats.json")]
    stats = analyze(params, *paths)
    return params, stats


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("analyzed")
    return folder, *_pipeline(folder)


def _reference(folder, scene_ids):
    """Valid pixels (GDAL's rule: no band at nodata) of the source rasters, scaled as tiles are; labels."""
    pixels, labels = [], []
    for scene_id in scene_ids:
        with rasterio.open(folder / f"{scene_id}.tif") as src:
            image = src.read()
        with rasterio.open(folder / f"{scene_id}_labels.tif") as lab:
            label = lab.read(1)
        valid = (image != 0).all(axis=0)
        pixels.append(scale_to_unit(image, "uint8", {"uint8": (0, 255)})[:, valid])
        labels.append(label[valid])
    return np.concatenate(pixels, axis=1), np.concatenate(labels)


def _assert_figures(got, pixels):
    np.testing.assert_allclose(got["mean"], pixels.astype(np.float64).mean(axis=1), rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["std"], pixels.astype(np.float64).std(axis=1), rtol=0, atol=1e-6)
    for q in (2, 98):
        exact = np.percentile(pixels, q, axis=1, method="inverted_cdf")
        assert np.all(np.abs(np.asarray(got[f"p{q}"]) - exact) <= PERCENTILE_ERROR + 1e-12), (q, got, exact)
    assert got["pixels"] == pixels.shape[1]


def test_statistics_equal_numpy_over_the_same_pixels(analyzed):
    folder, params, stats = analyzed
    pixels, labels = _reference(folder, ["s0", "s1"])
    assert pixels.shape[1] == 2 * 96 * 80 - 16 * 16 - 4 * 8 - 1, "nodata pixels are left out, unlabelled kept"
    _assert_figures(stats, pixels)
    for scene_id in ("s0", "s1"):
        _assert_figures(stats["scenes"][scene_id], _reference(folder, [scene_id])[0])
    assert set(stats["scenes"]) == {"s0", "s1"} and stats["bands"] == ["red", "green", "blue"]
    want = {name: int((labels == i + 1).sum()) for i, name in enumerate(params.data.class_names)}
    assert stats["class_pixels"] == want
    ignored = int((labels == 0).sum()) + 4 * 8 + 1  # unlabelled, or nodata in a kept tile
    assert stats["ignored_pixels"] == ignored
    assert stats["gsd_m"] == [1.0, 1.0] and stats["method"]["percentile_error"] == 0.5 / HIST_BINS
    assert json.loads((folder / "stats.json").read_text()) == stats


def test_val_and_test_scenes_change_nothing_in_the_statistics(analyzed, tmp_path):
    folder, _, _ = analyzed
    _pipeline(tmp_path, extreme=True)
    assert (tmp_path / "stats.json").read_bytes() == (folder / "stats.json").read_bytes()
    with rasterio.open(tmp_path / "s3.tif") as src:
        assert src.read().min() == 255, "the test scene really is saturated"
    # the same change to a training scene does change them: the comparison above can fail
    write_raster(tmp_path / "s1.tif", np.full((3, 80, 96), 255, np.uint8), nodata=0,
                 descriptions=["red", "green", "blue"])  # fmt: skip
    params = tiny_params(tmp_path)
    for name, run in (("ingest", ingest), ("tile", tile)):
        run(params, tmp_path / "catalog.csv" if name == "ingest" else tmp_path / "scenes.json",
            tmp_path / ("scenes.json" if name == "ingest" else "tiles"))  # fmt: skip
    changed = analyze(params, tmp_path / "scenes.json", tmp_path / "tiles", tmp_path / "split.json",
                      tmp_path / "changed.json")  # fmt: skip
    assert changed["mean"] != json.loads((folder / "stats.json").read_text())["mean"]


def test_one_tile_at_a_time_gives_the_same_figures(analyzed, monkeypatch):
    folder, params, stats = analyzed
    members = json.loads((folder / "split.json").read_text())["members"]["train"]
    monkeypatch.setattr(analysis, "BATCH_PIXELS", 1)  # every read one tile: memory is one tile's
    streamed = analysis.analyze_tiles(folder / "tiles", members, params.data.class_names)
    for key in ("mean", "std"):
        np.testing.assert_allclose(streamed[key], stats[key], rtol=0, atol=1e-12)
    assert [streamed[k] for k in ("p2", "p98", "pixels", "class_pixels")] == [
        stats[k] for k in ("p2", "p98", "pixels", "class_pixels")
    ]


def test_accumulator_matches_numpy_on_wide_ranging_values():
    rng = np.random.default_rng(5)
    acc, parts = BandAccumulator(2), []
    for n in (1, 7, 1000, 33333):  # uneven chunks: the pairwise merge must not care
        part = np.stack([rng.random(n) ** 3, np.round(rng.random(n) * 10000) / 10000]).astype(np.float32)
        part[:, :1] = 1.0  # the top edge lands in the last bin
        acc.add(part)
        parts.append(part)
    _assert_figures(acc.result(), np.concatenate(parts, axis=1))
    with pytest.raises(ValueError, match="no valid pixel"):
        BandAccumulator(1).result()


def test_analyze_without_tiles_is_one_line_naming_the_file(tmp_path, capsys):
    split_json = tmp_path / "split.json"
    split_json.write_text(json.dumps({"members": {"train": {"s0": None}, "val": {}, "test": {}}}))
    args = ["analyze", "--params", str(ROOT / "params.yaml"), "--tiles", str(tmp_path / "tiles"), "--split",
            str(split_json), "--scenes", str(tmp_path / "scenes.json"),
            "--out", str(tmp_path / "s.json")]  # fmt: skip
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "index.json" in err and "tilepipe tile" in err
    assert not (tmp_path / "s.json").exists()


def test_train_logs_the_statistics_to_its_mlflow_run(analyzed, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from tests.conftest import TRAIN, tiny_overrides

    folder, _, stats = analyzed
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    sets = [x for o in [*tiny_overrides(folder), *TRAIN, "train.epochs=1"] for x in ("--set", o)]
    paths = ["--tiles", str(folder / "tiles"), "--split", str(folder / "split.json"),
             "--stats", str(folder / "stats.json"), "--out", str(tmp_path / "models")]  # fmt: skip
    assert cli.main(["train", "--params", str(ROOT / "params.yaml"), *sets, *paths]) == 0
    run_id = json.loads((tmp_path / "models" / "run.json").read_text())["run_id"]
    logged = MlflowClient().download_artifacts(run_id, "training/stats.json", str(tmp_path))
    assert json.loads(open(logged).read()) == stats
