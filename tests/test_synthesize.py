import csv
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.features import rasterize
from rasterio.warp import Resampling, reproject, transform_geom

from tests.conftest import ROOT
from tilepipe.errors import TilepipeError
from tilepipe.fsutil import is_leftover
from tilepipe.params import BUILTIN_CLASSES, SynthesizeParams, load_params
from tilepipe.stages import synthesize as synth
from tilepipe.synth import plan as synth_plan
from tilepipe.synth import scenes as synth_scenes
from tilepipe.synth.fields import LIBRARY

CLASSES = [
    {"name": "water", "value": 1},
    {"name": "forest", "value": 2},
    {"name": "cropland", "value": 3},
    {"name": "urban", "value": 4},
    {"name": "bare", "value": 5},
]
NAMES = [c["name"] for c in CLASSES]
VALUES = [c["value"] for c in CLASSES]


def params(seed: int = 7, scenes: int = 4, classes: list[dict] = CLASSES) -> SynthesizeParams:
    return SynthesizeParams(scenes=scenes, min_size=100, max_size=160, seed=seed, classes=classes)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "synthetic"
    summary = synth.synthesize(params(), out)
    rows = list(csv.DictReader((out / "catalog.csv").open()))
    return out, summary, rows


def test_catalog_columns_and_relative_paths(built):
    out, summary, rows = built
    with (out / "catalog.csv").open() as f:
        assert f.readline().strip() == "scene_id,image,labels,bands"
    assert [r["scene_id"] for r in rows] == ["s00", "s01", "s02", "s03"]
    assert [s["scene_id"] for s in summary["scenes"]] == ["s00", "s01", "s02", "s03"]
    for r in rows:
        assert r["image"] == f"{r['scene_id']}.tif"
        assert r["labels"] in (f"{r['scene_id']}_labels.tif", f"{r['scene_id']}_labels.geojson")
        for key in ("image", "labels"):
            assert not Path(r[key]).is_absolute()
            assert (out / r[key]).is_file()
    kinds = {Path(r["labels"]).suffix for r in rows}
    assert kinds == {".tif", ".geojson"}
    assert not [p for p in out.parent.iterdir() if is_leftover(p)]


def test_sizes_gsd_and_crs(built):
    out, summary, rows = built
    crss, gsds = [], []
    for r in rows:
        with rasterio.open(out / r["image"]) as src:
            assert 100 <= src.width <= 160 and 100 <= src.height <= 160
            assert src.profile["tiled"] and src.profile["compress"] == "deflate"
            crss.append(src.crs.to_string())
            gsds.append(float(src.tags()["GSD_M"]))
            if src.crs.is_geographic:
                assert src.res[0] == pytest.approx(gsds[-1] / 111_320, rel=1e-6)
                assert -180 < src.bounds.left < 180 and -90 < src.bounds.bottom < 90
            else:
                assert src.res == (gsds[-1], gsds[-1])
                assert 100_000 < src.bounds.left < 900_000 and 0 < src.bounds.bottom < 10_000_000
    assert crss.count("EPSG:4326") == 1
    assert len(set(crss)) >= 3
    assert len(set(gsds)) >= 3 and all(0.5 <= g <= 10 for g in gsds)
    assert any(s["width"] != s["height"] for s in summary["scenes"])


def test_bands_dtypes_and_nodata(built):
    out, _, rows = built
    mapped, kinds, nodata_fracs = 0, set(), []
    for r in rows:
        with rasterio.open(out / r["image"]) as src:
            assert src.nodata == 0
            kinds.add(src.dtypes[0])
            if src.dtypes[0] == "uint8":
                assert src.count == 3 and src.descriptions == ("red", "green", "blue")
                assert r["bands"] == ""
            else:
                assert src.dtypes[0] == "uint16" and src.count == 4
                if r["bands"]:
                    mapped += 1
                    assert src.descriptions == (None,) * 4
                    assert r["bands"] == "blue=1;green=2;red=3;nir=4"
                else:
                    assert src.descriptions == ("blue", "green", "red", "nir")
            img = src.read()
            invalid = (img == 0).all(axis=0)
            assert ((img == 0).any(axis=0) == invalid).all()  # nodata in every band together
            nodata_fracs.append(invalid.mean())
            if src.dtypes[0] == "uint16":  # reflectance * 10000
                assert 100 < np.median(img[:, ~invalid]) < 5000
    assert kinds == {"uint8", "uint16"} and mapped == 1
    assert all(f < 0.5 for f in nodata_fracs) and sum(f > 0.01 for f in nodata_fracs) >= 3


def test_deterministic_and_seed_dependent(built, tmp_path):
    out, _, rows = built
    again = tmp_path / "again"
    synth.synthesize(params(), again)
    for r in rows:
        for key in ("image", "labels"):
            assert (out / r[key]).read_bytes() == (again / r[key]).read_bytes(), r[key]
    assert (out / "catalog.csv").read_bytes() == (again / "catalog.csv").read_bytes()
    other = tmp_path / "other"
    synth.synthesize(params(seed=8), other)
    assert (out / "s00.tif").read_bytes() != (other / "s00.tif").read_bytes()


def test_label_rasters_on_another_grid(built):
    out, _, rows = built
    other_crs = 0
    for r in rows:
        if not r["labels"].endswith(".tif"):
            continue
        with rasterio.open(out / r["image"]) as img, rasterio.open(out / r["labels"]) as lab:
            assert lab.dtypes[0] == "uint8" and lab.count == 1 and lab.nodata == 0
            assert lab.transform != img.transform and lab.shape != img.shape
            other_crs += lab.crs != img.crs
            values = lab.read(1)
            assert set(np.unique(values)) <= {0, *VALUES}
            assert (values > 0).mean() > 0.5 and len(np.unique(values[values > 0])) >= 2
    assert other_crs >= 1


def test_geojson_labels(built):
    out, _, rows = built
    kinds = set()
    for r in rows:
        if not r["labels"].endswith(".geojson"):
            continue
        doc = json.loads((out / r["labels"]).read_text())
        assert doc["type"] == "FeatureCollection" and doc["features"]
        classes = {f["properties"]["class"] for f in doc["features"]}
        assert classes <= set(NAMES) or classes <= set(VALUES)
        kinds.add(type(next(iter(classes))))
        x, y = doc["features"][0]["geometry"]["coordinates"][0][0]
        if "crs" in doc:  # the legacy member names the scene's own UTM zone
            with rasterio.open(out / r["image"]) as src:
                assert doc["crs"]["properties"]["name"] == src.crs.to_string()
                assert src.bounds.left - 10 <= x <= src.bounds.right + 10
        else:
            assert -180 <= x <= 180 and -90 <= y <= 90
    assert kinds == {str, int}


def test_imagery_follows_labels(built):
    """The image's class layout (from the generator) matches its labels, read back from disk."""
    out, _, rows = built
    for plan in synth_plan.plan_scenes(params(), len(CLASSES)):
        want = synth_scenes._window_classes(plan, np.arange(plan.height), np.arange(plan.width)) + 1
        path = out / next(r["labels"] for r in rows if r["scene_id"] == plan.sid)
        got = np.zeros(want.shape, np.uint8)
        if path.suffix == ".tif":
            with rasterio.open(path) as src:
                reproject(src.read(1), got, src_transform=src.transform, src_crs=src.crs,
                          dst_transform=plan.transform, dst_crs=plan.crs,
                          resampling=Resampling.nearest, src_nodata=0, dst_nodata=0)  # fmt: skip
            agree = 0.95  # 2x coarser grid: boundaries move by up to a pixel
        else:
            doc = json.loads(path.read_text())
            src_crs = doc.get("crs", {}).get("properties", {}).get("name", "EPSG:4326")
            shapes = []
            for f in doc["features"]:
                c = f["properties"]["class"]
                c = VALUES[NAMES.index(c)] if isinstance(c, str) else c
                shapes.append((transform_geom(src_crs, plan.crs, f["geometry"]), c))
            got = rasterize(shapes, out_shape=want.shape, transform=plan.transform, dtype="uint8")
            agree = 0.995
        labelled = got > 0
        assert labelled.mean() > 0.95
        assert (got[labelled] == want[labelled]).mean() >= agree


def test_custom_classes(tmp_path):
    classes = [{"name": "sea", "value": 10}, {"name": "wood", "value": 20}, {"name": "town", "value": 30}]
    out = tmp_path / "custom"
    synth.synthesize(params(scenes=3, classes=classes), out)
    for r in csv.DictReader((out / "catalog.csv").open()):
        if r["labels"].endswith(".tif"):
            with rasterio.open(out / r["labels"]) as src:
                assert set(np.unique(src.read(1))) <= {0, 10, 20, 30}
        else:
            doc = json.loads((out / r["labels"]).read_text())
            assert {f["properties"]["class"] for f in doc["features"]} <= {"sea", "wood", "town", 10, 20, 30}


def test_bad_builtin_classes_are_a_params_error_naming_the_key():
    six = CLASSES + [{"name": "snow", "value": 6}]
    zero = [{"name": "a", "value": 0}, {"name": "b", "value": 1}]
    for classes, words in ((six, "at most 5 classes"), (zero, "class value 0 marks unlabelled pixels")):
        with pytest.raises(TilepipeError, match=f"--set synthesize.classes=.*: synthesize: .*{words}"):
            load_params(ROOT / "params.yaml", [f"synthesize.classes={json.dumps(classes)}"])


def test_the_builtin_data_ignores_the_users_classes():
    """data.classes with 0 = background (the usual mask) neither breaks nor changes synthesize."""
    user = [{"name": "background", "value": 0}, {"name": "road", "value": 1}]
    overrides = [f"data.classes={json.dumps(user)}", "data.background=background"]
    mine = load_params(ROOT / "params.yaml", overrides)
    assert mine.synthesize == load_params(ROOT / "params.yaml").synthesize
    assert [c.name for c in mine.synthesize.classes] == list(BUILTIN_CLASSES) == [n for n, _ in LIBRARY]


def test_replaces_atomically(tmp_path, monkeypatch):
    out = tmp_path / "synthetic"
    out.mkdir()
    (out / "stale.txt").write_text("old")

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synth, "write_label_geojson", boom)
    with pytest.raises(RuntimeError):
        synth.synthesize(params(), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"]
    assert sorted(p.name for p in out.iterdir()) == ["stale.txt"]  # old output untouched

    monkeypatch.undo()
    synth.synthesize(params(), out)
    assert not (out / "stale.txt").exists() and (out / "catalog.csv").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"]


def test_windows_cover_scene_once():
    seen = np.zeros((700, 1500), int)
    for w in synth_scenes._windows(1500, 700, 256):
        assert w.row_off % 256 == 0 and w.col_off % 256 == 0
        seen[w.row_off : w.row_off + w.height, w.col_off : w.col_off + w.width] += 1
    assert (seen == 1).all()


def test_places_lack_different_land_covers():
    """Each scene lacks one land cover, dealt so every class is missing from equally many scenes."""
    from tilepipe.synth.fields import ABSENT, grid_classes

    plans = synth_plan.plan_scenes(SynthesizeParams(scenes=10, min_size=100, max_size=160, seed=7), 5)
    lacking = [np.flatnonzero(p.look.bias == ABSENT).tolist() for p in plans]
    assert all(len(a) == 1 for a in lacking)
    assert np.bincount([a[0] for a in lacking], minlength=5).tolist() == [2] * 5
    for plan, (absent,) in zip(plans[:3], lacking[:3], strict=True):
        xs = np.linspace(0, 4000, 200)
        assert absent not in np.unique(grid_classes(plan.look, xs, xs))
    few = synth_plan.plan_scenes(SynthesizeParams(scenes=4, min_size=100, max_size=160, seed=7), 3)
    assert not any((p.look.bias == ABSENT).any() for p in few)
