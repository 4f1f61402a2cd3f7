"""The model's input contract: the GSD range it was trained on, its bands and normalisation, enforced
by predict in one line, and recorded in each map's STAC item."""

import json

import pytest
import rasterio

from tests.conftest import ROOT, TRAIN, prepare_tiny_pipeline, write_raster, write_scene
from tilepipe import cli
from tilepipe.ml.checkpoint import load_model
from tilepipe.ml.training import train
from tilepipe.stages.analyze import analyze


def _trained(tmp_path, *overrides):
    tmp_path, params = prepare_tiny_pipeline(tmp_path, *TRAIN, "train.epochs=1", *overrides)
    paths = [tmp_path / name for name in ("scenes.json", "tiles", "split.json", "stats.json")]
    analyze(params, *paths)
    train(params, tmp_path / "tiles", tmp_path / "split.json", tmp_path / "models", stats_json=paths[-1])
    return tmp_path, load_model(tmp_path / "models" / "model.pt")[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _trained(tmp_path_factory.mktemp("contract"))


def _predict(model_dir, scene, output, *sets):
    args = ["predict", str(scene), str(output), "--model", str(model_dir / "model.pt")]
    return cli.main([*args, "--params", str(ROOT / "params.yaml"), *[f"--set={s}" for s in sets]])


def test_a_scene_outside_the_trained_gsd_range_is_refused_in_one_line(trained, tmp_path, capsys):
    folder, meta = trained
    assert meta.gsd is None and meta.gsd_range == [1.0, 1.0]
    coarse = write_scene(tmp_path, "coarse", res=2.0)["image"]
    assert _predict(folder / "models", coarse, tmp_path / "coarse_map.tif") == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "coarse.tif" in err and "ground resolution 2 m" in err
    assert "predict.gsd_tolerance (0.25)" in err and "1-1 m" in err
    assert not (tmp_path / "coarse_map.tif").exists() and not (tmp_path / "coarse_map.json").exists()
    assert _predict(folder / "models", coarse, tmp_path / "loose.tif", "predict.gsd_tolerance=1.5") == 0
    near = write_scene(tmp_path, "near", res=1.2)["image"]  # 20 % off: within the default 25 %
    assert _predict(folder / "models", near, tmp_path / "near_map.tif") == 0
    fine = write_scene(tmp_path, "fine", res=0.7)["image"]  # 30 % off
    assert _predict(folder / "models", fine, tmp_path / "fine_map.tif") == 1
    assert "ground resolution 0.7 m" in capsys.readouterr().err


def test_a_scene_lacking_a_model_band_is_refused_in_one_line(trained, tmp_path, capsys):
    folder, _ = trained
    with rasterio.open(folder / "s3.tif") as src:
        data, transform = src.read(), src.transform
    names = ["red", "green"]
    rg = write_raster(tmp_path / "rg.tif", data[:2], transform=transform, nodata=0, descriptions=names)
    assert _predict(folder / "models", rg, tmp_path / "rg_map.tif") == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "rg.tif" in err and "lacks band(s) blue" in err
    assert not (tmp_path / "rg_map.tif").exists()


def test_the_stac_item_records_bands_gsd_range_and_normalisation(trained, tmp_path):
    folder, _ = trained
    assert _predict(folder / "models", folder / "s3.tif", tmp_path / "s3_map.tif") == 0
    props = json.loads((tmp_path / "s3_map.json").read_text())["properties"]
    assert props["tilepipe:bands"] == ["red", "green", "blue"]
    assert props["tilepipe:gsd_range"] == [1.0, 1.0] and props["tilepipe:gsd"] is None
    assert props["tilepipe:normalize"] == "range"


def test_a_model_trained_at_one_tile_gsd_resamples_instead_of_refusing(tmp_path):
    (tmp_path / "gsd").mkdir()
    folder, meta = _trained(tmp_path / "gsd", "tile.gsd=2.0", "tile.max_nodata=0.9")
    assert meta.gsd == 2.0 and meta.gsd_range == [2.0, 2.0]
    fine = write_scene(tmp_path, "fine", res=0.5, size=(128, 96))["image"]
    assert _predict(folder / "models", fine, tmp_path / "fine_map.tif") == 0
    with rasterio.open(tmp_path / "fine_map.tif") as out:
        assert abs(out.res[0] - 2.0 * meta.tile_size // 2) < 1e-9  # cells of tile_size / 2 px at 2 m
