"""A corpus of bad inputs, made here, each run through the `tilepipe` CLI."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.warp import transform_geom

from tests.conftest import (
    ROOT,
    cut_pixel_data,
    tiny_overrides,
    write_catalog,
    write_geojson,
    write_raster,
    write_scene,
)
from tilepipe.geo.labels import IGNORE
from tilepipe.tiles.store import SceneTiles, read_index, verify_shards

TILEPIPE = str(Path(sys.executable).parent / "tilepipe")
TRUNCATED_HEADER = "not a readable raster (img.tif: TIFFReadDirectory"  # its directory was cut off
ABSURD_SIZE = "not a readable raster (img.tif: TIFFReadDirectory"  # 3e6 x 3e6 px in 64 x 64 of tiles
ORIGIN = (500000.0, 4000000.0)
SQUARE = {
    "type": "Polygon",
    "coordinates": [
        [
            (ORIGIN[0] + 4, ORIGIN[1] - 4),
            (ORIGIN[0] + 40, ORIGIN[1] - 4),
            (ORIGIN[0] + 40, ORIGIN[1] - 40),
            (ORIGIN[0] + 4, ORIGIN[1] - 40),
            (ORIGIN[0] + 4, ORIGIN[1] - 4),
        ]
    ],
}


def _image(folder: Path, name="img.tif", **kw) -> Path:
    data = kw.pop("data", np.full((3, 64, 64), 90, dtype=np.uint8))
    kw.setdefault("descriptions", ["red", "green", "blue"])
    return write_raster(folder / name, data, kw.pop("crs", "EPSG:32633"), from_origin(*ORIGIN, 1, 1), **kw)


def _labels(folder: Path, name="labels.tif", value=2, **kw) -> Path:
    data = np.full((64, 64), value, dtype=np.uint8)
    return write_raster(folder / name, data, "EPSG:32633", kw.pop("transform", from_origin(*ORIGIN, 1, 1)))


def _patch_tiff_size(path: Path, width: int, height: int) -> None:
    """Rewrite the ImageWidth / ImageLength tags of a classic little-endian TIFF in place."""
    raw = bytearray(path.read_bytes())
    assert raw[:4] == b"II*\x00"
    (ifd,) = struct.unpack_from("<I", raw, 4)
    (count,) = struct.unpack_from("<H", raw, ifd)
    for i in range(count):
        entry = ifd + 2 + 12 * i
        tag, kind = struct.unpack_from("<HH", raw, entry)
        if tag in (256, 257):
            value = width if tag == 256 else height
            struct.pack_into("<HHII", raw, entry, tag, 4, 1, value)
    path.write_bytes(bytes(raw))


# Each case writes its files into d and returns (image, labels, culprit, problem): the catalog's
# image and labels, the file the error must name first and what it must say is wrong with it.


def case_empty_file(d):
    (d / "img.tif").write_bytes(b"")
    return "img.tif", _labels(d).name, "img.tif", "file is empty"


def case_truncated_tiff(d):
    img = _image(d, data=np.random.default_rng(0).integers(1, 255, (3, 64, 64), dtype=np.uint8))
    img.write_bytes(img.read_bytes()[:600])
    return img.name, _labels(d).name, "img.tif", TRUNCATED_HEADER


def case_text_named_tif(d):
    (d / "img.tif").write_text("this is not an image\n")
    return "img.tif", _labels(d).name, "img.tif", "not a readable raster"


def case_no_crs(d):
    return _image(d, crs=None).name, _labels(d).name, "img.tif", "has no CRS"


def case_no_geotransform(d):
    path = d / "img.tif"
    profile = {
        "driver": "GTiff",
        "width": 64,
        "height": 64,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32633",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.full((3, 64, 64), 90, dtype=np.uint8))
    return path.name, _labels(d).name, "img.tif", "has no geotransform"


def case_labels_elsewhere(d):
    far = from_origin(ORIGIN[0] + 10_000, ORIGIN[1], 1, 1)
    return _image(d).name, _labels(d, transform=far).name, "labels.tif", "labels do not overlap their image"


def case_labels_in_another_crs_elsewhere(d):
    data = np.full((64, 64), 2, dtype=np.uint8)  # the same numbers, but in UTM 10N: another continent
    labels = write_raster(d / "labels.tif", data, "EPSG:32610", from_origin(*ORIGIN, 1, 1))
    return _image(d).name, labels.name, "labels.tif", "labels do not overlap their image"


def case_geojson_outside_the_image(d):
    x, y = ORIGIN[0] + 500, ORIGIN[1] - 500  # the image covers 64 m x 64 m from ORIGIN
    away = {"type": "Polygon", "coordinates": [[(x, y), (x + 9, y), (x + 9, y - 9), (x, y - 9), (x, y)]]}
    labels = write_geojson(d / "l.geojson", [(away, "forest")], crs="EPSG:32633")
    return _image(d).name, labels.name, "l.geojson", "labels do not overlap their image"


def case_unknown_label_values(d):
    return _image(d).name, _labels(d, value=9).name, "labels.tif", "label values [9] are not classes"


def case_float_label_raster(d):
    data = np.full((64, 64), 2.5, dtype=np.float32)
    labels = write_raster(d / "labels.tif", data, "EPSG:32633", from_origin(*ORIGIN, 1, 1))
    return _image(d).name, labels.name, "labels.tif", "label raster must hold integer classes, not float32"


def case_labels_path_is_a_directory(d):
    (d / "labels").mkdir()
    return _image(d).name, "labels", "labels", "is a directory, not a file"


def case_image_is_a_symlink_loop(d):
    (d / "img.tif").symlink_to("loop.tif")
    (d / "loop.tif").symlink_to("img.tif")
    return "img.tif", _labels(d).name, "img.tif", "symlink loop"


def case_image_is_a_broken_symlink(d):
    (d / "img.tif").symlink_to("gone.tif")
    return "img.tif", _labels(d).name, "img.tif", "broken symlink: it points to gone.tif"


def case_invalid_geometry(d):
    bowtie = {"type": "Polygon", "coordinates": [[(0, 0), (10, 10), (10, 0), (0, 10), (0, 0)]]}
    labels = write_geojson(d / "l.geojson", [(bowtie, "forest")], crs="EPSG:32633")
    return _image(d).name, labels.name, "l.geojson", "invalid geometry"


def case_geojson_without_class(d):
    path = d / "l.geojson"
    path.write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "features": [{"type": "Feature", "properties": {"kind": "forest"}, "geometry": SQUARE}],
            }
        )
    )
    return _image(d).name, path.name, "l.geojson", "no `class` attribute"


def case_geojson_empty(d):
    return _image(d).name, write_geojson(d / "l.geojson", []).name, "l.geojson", "holds no features"


def case_geojson_unknown_class(d):
    labels = write_geojson(d / "l.geojson", [(SQUARE, "lava")], crs="EPSG:32633")
    return _image(d).name, labels.name, "l.geojson", "'lava'"


def case_all_nodata(d):
    image = _image(d, data=np.zeros((3, 64, 64), dtype=np.uint8), nodata=0)
    return image.name, _labels(d).name, "img.tif", "every pixel is nodata"


def case_nan_float(d):
    data = np.full((3, 64, 64), np.nan, dtype=np.float32)
    return _image(d, data=data).name, _labels(d).name, "img.tif", "every pixel is nodata"


def case_absurd_dimensions(d):
    img = _image(d)
    _patch_tiff_size(img, 3_000_000, 3_000_000)
    return img.name, _labels(d).name, "img.tif", ABSURD_SIZE


def case_missing_band(d):
    pan = _image(d, data=np.full((1, 64, 64), 900, dtype=np.uint16), descriptions=["pan"])
    return pan.name, _labels(d).name, "img.tif", "lacks band(s) red, green, blue"


def case_unnamed_bands(d):
    return _image(d, descriptions=[]).name, _labels(d).name, "img.tif", "carry no names"


def case_missing_image_file(d):
    return "nope.tif", _labels(d).name, "nope.tif", "file not found"


def case_missing_label_file(d):
    return _image(d).name, "nope.geojson", "nope.geojson", "label file not found"


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


def _ingest(tmp_path, catalog, *extra):
    sets = [x for o in tiny_overrides(tmp_path) for x in ("--set", o)]
    out = tmp_path / "out" / "scenes.json"
    cmd = [
        TILEPIPE,
        "ingest",
        "--params",
        str(ROOT / "params.yaml"),
        *sets,
        "--catalog",
        str(catalog),
        "--out",
        str(out),
        *extra,
    ]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120), out


def _assert_one_line_error(result, out, *needles, culprit=None, command="ingest"):
    """Exit 1, one line `tilepipe COMMAND: error: CULPRIT: PROBLEM` holding every needle, no output."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith(f"tilepipe {command}: error: "), lines[0]
    if culprit is not None:
        assert lines[0].startswith(f"tilepipe {command}: error: {culprit}: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists(), "no partial output"
    assert not list(out.parent.glob("*.tmp")) if out.parent.exists() else True


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_scene_is_one_clear_line(tmp_path, case):
    image, labels, culprit, problem = CASES[case](tmp_path)
    catalog = write_catalog(tmp_path, [{"scene_id": "a", "image": image, "labels": labels}])
    result, out = _ingest(tmp_path, catalog)
    _assert_one_line_error(result, out, problem, culprit=tmp_path / culprit)


@pytest.mark.parametrize(
    ("header", "rows", "message"),
    [
        ("scene_id,image", ["a,img.tif"], "lacks column(s) labels"),
        ("scene_id,image,labels", ["a,img.tif,labels.tif", "a,img.tif,labels.tif"], "duplicate scene_id 'a'"),
        ("scene_id,image,labels,split", ["a,img.tif,labels.tif,holdout"], "split 'holdout'"),
        ("scene_id,image,labels", [], "lists no scenes"),
        ("scene_id,image,labels", ["..,img.tif,labels.tif"], "scene_id '..' must be"),
        ("scene_id,image,labels", ["a/b,img.tif,labels.tif"], "scene_id 'a/b' must be"),
        ("scene_id,image,labels", ["a,,labels.tif"], "scene 'a' has no image"),
        ("scene_id,image,labels,bands", ["a,img.tif,labels.tif,red=1,green=2"], "line 2: 5 fields but the"),
    ],
)
def test_bad_catalog_is_one_clear_line(tmp_path, header, rows, message):
    _image(tmp_path)
    _labels(tmp_path)
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("\n".join([header, *rows]) + "\n")
    result, out = _ingest(tmp_path, catalog)
    _assert_one_line_error(result, out, message, "catalog.csv")


def test_missing_catalog_is_one_clear_line(tmp_path):
    result, out = _ingest(tmp_path, tmp_path / "nope.csv")
    _assert_one_line_error(result, out, "catalog not found", culprit=tmp_path / "nope.csv")


def test_a_catalog_that_is_a_directory_says_so(tmp_path):
    (tmp_path / "catalog.csv").mkdir()
    result, out = _ingest(tmp_path, tmp_path / "catalog.csv")
    _assert_one_line_error(result, out, "is a directory, not a file", culprit=tmp_path / "catalog.csv")


def test_a_catalog_that_is_not_utf8_names_the_line_and_byte(tmp_path):
    _image(tmp_path)
    _labels(tmp_path)
    catalog = tmp_path / "catalog.csv"
    catalog.write_bytes("scene_id,image,labels\nsc\u00e8ne,img.tif,labels.tif\n".encode("latin-1"))
    result, out = _ingest(tmp_path, catalog)
    _assert_one_line_error(result, out, "line 2: byte 0xe8 is not UTF-8", culprit=catalog)


def test_usable_but_suspicious_pixels_are_warnings_naming_the_file(tmp_path):
    nan = np.random.default_rng(0).random((3, 64, 64)).astype(np.float32)
    nan[:, :8, :] = np.nan  # an eighth of the image: the top half of the first row of 16 px tiles
    zeros = np.zeros((3, 64, 64), dtype=np.uint8)  # and no nodata value: nothing to learn from
    rows = []
    for name, data in (("nan", nan), ("zeros", zeros)):
        image = _image(tmp_path, name=f"{name}.tif", data=data)
        rows.append({"scene_id": name, "image": image.name, "labels": _labels(tmp_path).name})
    result, out = _ingest(tmp_path, write_catalog(tmp_path, rows))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == [
        f"warning: {tmp_path / 'nan.tif'}: 12.5% of the sampled pixels are NaN or infinite: "
        "they are treated as nodata",
        f"warning: {tmp_path / 'zeros.tif'}: every pixel is 0 and the file sets no nodata: "
        "it carries no signal (kept)",
    ], result.stderr
    scenes = {s["scene_id"]: s for s in json.loads(out.read_text())["scenes"]}
    assert scenes["nan"]["nodata_fraction"] == 0.125
    # NaN becomes nodata: the tiles over it are dropped (tile.max_nodata) or masked, never NaN
    sets = [x for o in [*tiny_overrides(tmp_path), "tile.max_nodata=0.6"] for x in ("--set", o)]
    cmd = [TILEPIPE, "tile", "--params", str(ROOT / "params.yaml"), *sets, "--scenes", str(out)]
    tiles = tmp_path / "tiles"
    result = subprocess.run([*cmd, "--out", str(tiles)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    store = SceneTiles(tiles / "nan")
    images = np.stack([store.image(i) for i in range(len(store))])
    assert np.isfinite(images).all() and len(store) == 16  # 64 x 64 px in 16 px tiles, none dropped
    top = [i for i in range(16) if store.index["tiles"]["row"][i] == 0]  # half NaN, half valid
    labels = np.stack([store.label(i) for i in top])
    assert (labels[:, :8] == IGNORE).all() and (labels[:, 8:] != IGNORE).all()
    assert (images[top][:, :, :8] == 0).all() and (images[top][:, :, 8:] > 0).any()


@pytest.mark.parametrize(
    ("bands", "message"),
    [
        ("red=1;green", "bad band mapping"),
        ("red=1;green=2;blue=7", "band mapping blue=7 but file has 3 band(s)"),
    ],
)
def test_bad_band_mapping_is_one_clear_line(tmp_path, bands, message):
    image, labels = _image(tmp_path, descriptions=[]), _labels(tmp_path)
    row = {"scene_id": "a", "image": image.name, "labels": labels.name, "bands": bands}
    result, out = _ingest(tmp_path, write_catalog(tmp_path, [row]))
    _assert_one_line_error(result, out, message)


def test_skip_mode_warns_and_keeps_good_scenes(tmp_path):
    good = write_scene(tmp_path, "good")
    (tmp_path / "bad.tif").write_text("not a tiff")
    catalog = write_catalog(
        tmp_path,
        [
            {"scene_id": "good", "image": good["image"].name, "labels": good["labels"].name},
            {"scene_id": "bad", "image": "bad.tif", "labels": good["labels"].name},
        ],
    )
    result, out = _ingest(tmp_path, catalog, "--set", "ingest.on_error=skip")
    assert result.returncode == 0, result.stderr
    assert "warning: skipping scene bad" in result.stderr and "bad.tif" in result.stderr
    assert [s["scene_id"] for s in json.loads(out.read_text())["scenes"]] == ["good"]


def test_geojson_in_another_crs_is_reprojected(tmp_path):
    image = _image(tmp_path)
    lonlat = transform_geom("EPSG:32633", "EPSG:4326", SQUARE)
    labels = write_geojson(tmp_path / "l.geojson", [(lonlat, "urban")])
    catalog = write_catalog(tmp_path, [{"scene_id": "a", "image": image.name, "labels": labels.name}])
    result, out = _ingest(tmp_path, catalog)
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["scenes"][0]["labels_kind"] == "geojson"


@pytest.mark.parametrize(
    ("args", "culprit", "problem"),
    [
        (["--set", "tile.size=abc"], "--set tile.size=abc", "tile.size: Input should be a valid integer"),
        (["--set", "tile.size"], "--set 'tile.size'", "expected KEY=VALUE"),
        (["--set", "tile.size=[1"], "--set tile.size", "value is not valid YAML"),
    ],
)
def test_bad_overrides_are_one_line_naming_the_set(tmp_path, args, culprit, problem):
    result, out = _ingest(tmp_path, write_catalog(tmp_path, []), *args)
    _assert_one_line_error(result, out, problem, culprit=culprit)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("seed: [1, 2\ndata: {\n", "not valid YAML (expected ',' or ']', but got ':' at line 2, column 5)"),
        ("- just\n- a list\n", "expected a mapping of sections at the top level"),
        (None, "is a directory, not a file"),
    ],
)
def test_a_params_file_that_is_not_yaml_params_is_one_line(tmp_path, text, problem):
    params = tmp_path / "params.yaml"
    if text is None:
        params.mkdir()
    else:
        params.write_text(text)
    out = tmp_path / "out" / "scenes.json"
    cmd = [TILEPIPE, "ingest", "--params", str(params), "--catalog", str(tmp_path / "c.csv")]
    result = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=120)
    _assert_one_line_error(result, out, problem, culprit=params)


def test_damaged_pixel_data_fails_tiling_naming_scene_and_pixels(tmp_path):
    """Header intact, pixel data cut short: ingest passes, tiling names the scene and the pixels."""
    rng = np.random.default_rng(0)
    rows = []
    for name in ("a", "bad", "c"):
        data = rng.integers(1, 255, (3, 256, 256), dtype=np.uint8)  # no nodata: ingest reads no pixels
        image = _image(tmp_path, name=f"{name}.tif", data=data)
        rows.append({"scene_id": name, "image": image.name, "labels": _labels(tmp_path).name})
    bad = cut_pixel_data(tmp_path / "bad.tif")
    result, scenes = _ingest(tmp_path, write_catalog(tmp_path, rows))
    assert result.returncode == 0, result.stderr
    tiles = tmp_path / "tiles"
    sets = [x for o in tiny_overrides(tmp_path) for x in ("--set", o)]
    cmd = [TILEPIPE, "tile", "--params", str(ROOT / "params.yaml"), *sets, "--scenes", str(scenes)]
    result = subprocess.run([*cmd, "--out", str(tiles)], capture_output=True, text=True, timeout=300)
    problem = "scene bad: damaged data: rows "
    _assert_one_line_error(result, tiles / "summary.json", problem, command="tile", culprit=bad)
    assert "cannot be read (" in result.stderr
    assert sorted(p.name for p in tiles.iterdir()) == ["a", "c"], "no partial output of the damaged scene"
    for name in ("a", "c"):
        index = read_index(tiles / name)
        assert verify_shards(tiles / name, index) is None and index["tile_count"] > 0
