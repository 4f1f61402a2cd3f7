"""STAC catalogs as input: Catalog with child links, Collection, ItemCollection; eo:bands and STAC 1.1
bands; raster and GeoJSON labels; label:classes; the same tiles as the equivalent CSV catalog."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

from tests.conftest import CLASSES, ROOT, tiny_params, write_catalog, write_geojson, write_raster
from tilepipe.errors import TilepipeError
from tilepipe.ml.training import train
from tilepipe.stages.ingest import ingest
from tilepipe.stages.predict import predict_held_out, predict_one
from tilepipe.stages.split import split
from tilepipe.stages.tile import tile

BIN = Path(sys.executable).parent
SPLITS = ["train", "train", "val", "test", "test"]
ORIGIN = (500000.0, 4000000.0)
TRAIN = ["train.epochs=1", "train.batch_size=16", "train.width=8", "train.min_purity=0.5", "train.lr=0.01"]


def stripes(width: int = 96, height: int = 80) -> np.ndarray:
    """Class values 1..5 in vertical stripes."""
    return (np.arange(width)[None, :] * 5 // width + 1).repeat(height, axis=0).astype(np.uint8)


def write_imagery(folder: Path) -> None:
    """Five scenes with unnamed bands (their names come from the catalog): s0-s2 raster labels,
    s3-s4 GeoJSON labels (the same stripes as polygons with class names)."""
    folder.mkdir(parents=True, exist_ok=True)
    classes = stripes()
    transform = from_origin(*ORIGIN, 1.0, 1.0)
    for i in range(5):
        rng = np.random.default_rng(i)
        image = np.stack([classes * 40 + rng.integers(1, 20, classes.shape) for _ in range(3)]).astype(
            np.uint8
        )
        write_raster(folder / f"s{i}.tif", image, "EPSG:32633", transform, nodata=0)
        if i < 3:
            write_raster(folder / f"s{i}_labels.tif", classes, "EPSG:32633", transform, nodata=0)
            continue
        polygons = []
        for value in range(1, 6):
            cols = np.flatnonzero(classes[0] == value)
            x0, x1, y0, y1 = ORIGIN[0] + cols[0], ORIGIN[0] + cols[-1] + 1, ORIGIN[1], ORIGIN[1] - 80
            ring = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
            polygons.append(({"type": "Polygon", "coordinates": [ring]}, CLASSES[value - 1]))
        write_geojson(folder / f"s{i}.geojson", polygons, crs="EPSG:32633")


def label_file(i: int) -> str:
    return f"s{i}_labels.tif" if i < 3 else f"s{i}.geojson"


def item(i: int, prefix: str, stac_11: bool = False, **props) -> dict:
    """A STAC item for scene s<i>; asset hrefs are relative to the item's JSON file (``prefix``)."""
    common = ["red", "green", "blue"]
    bands = (
        {"bands": [{"name": f"b{k + 1}", "eo:common_name": c} for k, c in enumerate(common)]}
        if stac_11
        else {"eo:bands": [{"name": f"b{k + 1}", "common_name": c} for k, c in enumerate(common)]}
    )
    lon, lat = 15.0, 36.1
    return {
        "type": "Feature",
        "stac_version": "1.1.0" if stac_11 else "1.0.0",
        "stac_extensions": [],
        "id": f"s{i}",
        "geometry": {"type": "Point", "coordinates": [lon, lat]},
        "bbox": [lon, lat, lon, lat],
        "properties": {
            "datetime": f"2024-0{i + 1}-15T10:30:00Z",
            "tilepipe:split": SPLITS[i],
            "label:classes": [{"name": "class", "classes": CLASSES if i >= 3 else [1, 2, 3, 4, 5]}],
            **props,
        },
        "links": [],
        "assets": {
            "image": {"href": f"{prefix}s{i}.tif", "roles": ["data"], **bands},
            "labels": {"href": f"{prefix}{label_file(i)}", "roles": ["labels"]},
        },
    }


def catalog_tree(folder: Path) -> Path:
    """catalog.json -> child collection (items s0-s2, item links) and a nested child catalog (s3, s4)."""
    (folder / "stac" / "landcover" / "items").mkdir(parents=True)
    (folder / "stac" / "more").mkdir(parents=True)
    root = {"type": "Catalog", "stac_version": "1.0.0", "id": "root", "description": "scenes",
            "links": [{"rel": "child", "href": "./landcover/collection.json"},
                      {"rel": "child", "href": "more/catalog.json"}]}  # fmt: skip
    collection = {
        "type": "Collection", "stac_version": "1.0.0", "id": "landcover", "description": "d",
        "license": "proprietary",
        "extent": {"spatial": {"bbox": [[15, 36, 15.1, 36.2]]},
                   "temporal": {"interval": [["2024-01-01T00:00:00Z", None]]}},
        "links": [{"rel": "item", "href": f"items/s{i}.json"} for i in range(3)],
    }  # fmt: skip
    more = {"type": "Catalog", "stac_version": "1.0.0", "id": "more", "description": "m",
            "links": [{"rel": "item", "href": f"./s{i}.json"} for i in (3, 4)]}  # fmt: skip
    (folder / "stac" / "catalog.json").write_text(json.dumps(root))
    (folder / "stac" / "landcover" / "collection.json").write_text(json.dumps(collection))
    (folder / "stac" / "more" / "catalog.json").write_text(json.dumps(more))
    for i in range(3):
        (folder / "stac" / "landcover" / "items" / f"s{i}.json").write_text(json.dumps(item(i, "../../../")))
    for i in (3, 4):
        (folder / "stac" / "more" / f"s{i}.json").write_text(json.dumps(item(i, "../../", stac_11=True)))
    return folder / "stac" / "catalog.json"


def item_collection(folder: Path) -> Path:
    items = [item(i, "", stac_11=i % 2 == 1) for i in range(5)]
    path = folder / "items.json"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    return path


def csv_catalog(folder: Path) -> Path:
    rows = [{"scene_id": f"s{i}", "image": f"s{i}.tif", "labels": label_file(i), "split": SPLITS[i],
             "bands": "red=1;green=2;blue=3"} for i in range(5)]  # fmt: skip
    return write_catalog(folder, rows, "catalog.csv")


def tiled(folder: Path, catalog: Path, name: str, *sets: str):
    params = tiny_params(folder, f"data.catalog={catalog}", *sets)
    ingest(params, catalog, folder / f"{name}.json")
    tile(params, folder / f"{name}.json", folder / f"{name}-tiles")
    return params


def tile_bytes(tiles: Path) -> dict[str, bytes]:
    return {p.relative_to(tiles).as_posix(): p.read_bytes() for p in sorted(tiles.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("layout", ["catalog", "item collection"])
def test_stac_catalogs_tile_like_the_equivalent_csv(tmp_path, layout):
    write_imagery(tmp_path)
    stac = catalog_tree(tmp_path) if layout == "catalog" else item_collection(tmp_path)
    tiled(tmp_path, csv_catalog(tmp_path), "csv")
    tiled(tmp_path, stac, "stac")

    assert tile_bytes(tmp_path / "stac-tiles") == tile_bytes(tmp_path / "csv-tiles")
    records = {s["scene_id"]: s for s in json.loads((tmp_path / "stac.json").read_text())["scenes"]}
    assert list(records) == [f"s{i}" for i in range(5)]
    assert records["s0"]["input_bands"] == {"red": 1, "green": 2, "blue": 3}
    assert records["s3"]["labels_kind"] == "geojson" and records["s3"]["split"] == "test"
    assert records["s2"]["datetime"] == "2024-03-15T10:30:00+00:00"


def test_a_stac_catalog_trains_and_predicts_and_converts_to_csv(tmp_path):
    write_imagery(tmp_path)
    stac = catalog_tree(tmp_path)
    shown = subprocess.run(
        [str(BIN / "tilepipe"), "catalog", str(stac), "--to-csv", str(tmp_path / "out" / "catalog.csv")],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith("s0: 96x80 EPSG:32633 1 m, bands red,green,blue, uint8"), lines[0]
    assert lines[4].endswith("labels geojson (5 classes), split test"), lines[4]
    params = tiled(tmp_path, stac, "stac", *TRAIN)
    tiled(tmp_path, tmp_path / "out" / "catalog.csv", "csv")  # the written CSV tiles the same
    assert tile_bytes(tmp_path / "csv-tiles") == tile_bytes(tmp_path / "stac-tiles")

    split(params, tmp_path / "stac.json", tmp_path / "stac-tiles", tmp_path / "split.json")
    assert sorted(json.loads((tmp_path / "split.json").read_text())["members"]["test"]) == ["s3", "s4"]
    torch.manual_seed(0)
    train(params, tmp_path / "stac-tiles", tmp_path / "split.json", tmp_path / "models")
    maps = predict_held_out(params, tmp_path / "models", tmp_path / "stac.json", tmp_path / "split.json",
                            tmp_path / "maps")  # fmt: skip
    assert [m["scene_id"] for m in maps] == ["s3", "s4"]
    with rasterio.open(tmp_path / "maps" / "s3.tif") as out:
        assert out.crs.to_string() == "EPSG:32633" and out.read(1).any()

    # A Landsat 8 style uint16 stack described B2_blue, B3_green, B4_red, B5_nir: no mapping needed.
    classes = stripes()
    landsat = np.stack([classes.astype(np.uint16) * 1500 + k for k in range(4)])
    write_raster(tmp_path / "lc08.tif", landsat, "EPSG:32633", from_origin(*ORIGIN, 1.0, 1.0),
                 descriptions=["B2_blue", "B3_green", "B4_red", "B5_nir"])  # fmt: skip
    summary = predict_one(params, tmp_path / "models", tmp_path / "lc08.tif", tmp_path / "lc08_map.tif")
    assert summary["width"] > 0 and (tmp_path / "lc08_map.tif").is_file()


def _landsat(path: Path, names: list[str], tags: dict | None = None) -> Path:
    data = np.stack([stripes().astype(np.uint16) * 1000 + k for k in range(len(names))])
    write_raster(path, data, "EPSG:32633", from_origin(*ORIGIN, 1.0, 1.0), descriptions=names)
    if tags:
        with rasterio.open(path, "r+") as dst:
            dst.update_tags(**tags)
    return path


def test_landsat_7_and_8_band_codes_need_the_sensor(tmp_path):
    from tilepipe.geo.bands import resolve_bands

    codes = [f"B{i}" for i in range(1, 8)]
    plain = _landsat(tmp_path / "plain.tif", codes)
    l8 = _landsat(tmp_path / "l8.tif", codes, {"SPACECRAFT_ID": "LANDSAT_8"})
    l7 = _landsat(tmp_path / "l7.tif", codes, {"SPACECRAFT_ID": "LANDSAT_7"})
    with rasterio.open(l8) as src:
        assert resolve_bands(src, {}, ["red", "green", "blue", "nir"]) == [4, 3, 2, 5]
    with rasterio.open(l7) as src:
        assert resolve_bands(src, {}, ["red", "green", "blue", "nir"]) == [3, 2, 1, 4]
    with rasterio.open(plain) as src:  # a STAC platform names the sensor as a file tag does
        assert resolve_bands(src, {}, ["red"], sensor="landsat-oli") == [4]
        assert resolve_bands(src, {"red": "B4", "green": "b3", "blue": 2}, ["red", "green", "blue"]) == [
            4,
            3,
            2,
        ]
        with pytest.raises(TilepipeError) as caught:
            resolve_bands(src, {}, ["red", "green", "blue"])
    message = str(caught.value)
    assert message.startswith(
        f"{plain}: band names B1, B2, B3, B4, B5, B6, B7 mean different bands on Landsat"
    )
    assert "red=B4;green=B3;blue=B2" in message and "\n" not in message

    # The same mistake from the command line: one line, no traceback, no output.
    write_raster(tmp_path / "plain_labels.tif", stripes(), "EPSG:32633", from_origin(*ORIGIN, 1.0, 1.0))
    catalog = write_catalog(tmp_path, [{"scene_id": "p", "image": "plain.tif", "labels": "plain_labels.tif"}])
    out = tmp_path / "scenes.json"
    cmd = [str(BIN / "tilepipe"), "ingest", "--catalog", str(catalog), "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "mean different bands on Landsat 4-7 and Landsat 8-9" in lines[0] and not out.exists()


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["B02", "B03", "B04", "B08"], [3, 2, 1, 4]),  # Sentinel-2: zero-padded codes tell the sensor
        (["SR_B2", "SR_B3", "SR_B4", "SR_B5"], None),  # Landsat Collection 2 with no sensor: ambiguous
        (["red_B4", "green_B3", "blue_B2", "nir_B5"], [1, 2, 3, 4]),
        (["Red", "Green", "Blue", "NIR"], [1, 2, 3, 4]),
    ],
)
def test_band_spellings(tmp_path, names, expected):
    from tilepipe.geo.bands import resolve_bands

    with rasterio.open(_landsat(tmp_path / "x.tif", names)) as src:
        if expected is None:
            with pytest.raises(TilepipeError, match="mean different bands on Landsat"):
                resolve_bands(src, {}, ["red", "green", "blue", "nir"])
        else:
            assert resolve_bands(src, {}, ["red", "green", "blue", "nir"]) == expected


def test_the_docs_show_the_band_table():
    from tilepipe.geo.bands import spelling_table

    assert spelling_table() in (ROOT / "docs" / "catalogs.md").read_text()


def _break(tmp_path: Path, how: str) -> tuple[Path, str]:
    """A STAC catalog tree with one mistake; returns the catalog and the start of the expected error."""
    stac = catalog_tree(tmp_path)
    items = tmp_path / "stac" / "landcover" / "items"
    s1 = items / "s1.json"
    doc = json.loads(s1.read_text())
    if how == "broken link":
        (tmp_path / "stac" / "more" / "catalog.json").unlink()
        return (
            stac,
            f"{stac}: broken child link: {tmp_path / 'stac' / 'more' / 'catalog.json'}: file not found",
        )
    if how == "no data asset":
        doc["assets"]["image"]["roles"] = ["overview"]
        s1.write_text(json.dumps(doc))
        return stac, f"{s1}: item s1 has no asset with role 'data' (assets: image, labels)"
    if how == "missing file":
        (tmp_path / "s1.tif").unlink()
        return stac, f"{s1}: item s1: asset 'image' (../../../s1.tif): file not found"
    if how == "does not open":
        (tmp_path / "s1.tif").write_bytes(b"not a tiff at all")
        return stac, f"{s1} (item s1): {tmp_path / 's1.tif'}: not a readable raster"
    if how == "no red band":
        doc["assets"]["image"]["eo:bands"][0]["common_name"] = "nir"
        s1.write_text(json.dumps(doc))
        return stac, f"{s1} (item s1): {tmp_path / 's1.tif'}: lacks band(s) red (has nir, green, blue)"
    doc["properties"]["label:classes"][0]["classes"] = [1, 2, "snow"]
    s1.write_text(json.dumps(doc))
    return stac, f"{s1} (item s1): label:classes lists class 'snow', which data.classes does not define"


@pytest.mark.parametrize(
    "how", ["broken link", "no data asset", "missing file", "does not open", "no red band", "unknown class"]
)
def test_stac_mistakes_are_one_line_naming_the_json(tmp_path, how):
    write_imagery(tmp_path)
    stac, expected = _break(tmp_path, how)
    params = tiny_params(tmp_path, f"data.catalog={stac}")
    with pytest.raises(TilepipeError) as caught:
        ingest(params, stac, tmp_path / "scenes.json")
    message = str(caught.value)
    assert message.startswith(expected), message
    assert "\n" not in message and not (tmp_path / "scenes.json").exists()
