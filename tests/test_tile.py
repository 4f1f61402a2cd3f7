import json

import numpy as np
import pytest
from rasterio.transform import from_origin
from rasterio.warp import transform as warp_transform
from rasterio.warp import transform_geom

from tests.conftest import tiny_params, write_catalog, write_geojson, write_raster, write_scene
from tilepipe.errors import TilepipeError
from tilepipe.geo.labels import IGNORE
from tilepipe.stages.ingest import ingest
from tilepipe.stages.tile import tile
from tilepipe.tiles.store import SceneTiles, ShardWriter, read_index, verify_shards, write_index

ORIGIN = (500000.0, 4000000.0)


def _run(tmp_path, catalog, *overrides):
    params = tiny_params(tmp_path, *overrides)
    ingest(params, catalog, tmp_path / "scenes.json")
    return params, tile(params, tmp_path / "scenes.json", tmp_path / "tiles")


def _label_at(store: SceneTiles, x: int, y: int) -> int:
    """Class index at grid pixel (x, y), looked up through the tile that holds it."""
    index = store.index
    size = index["tile_size"]
    for i, (tx, ty) in enumerate(zip(index["tiles"]["x"], index["tiles"]["y"], strict=True)):
        if tx <= x < tx + size and ty <= y < ty + size:
            return int(store.label(i)[y - ty, x - tx])
    raise AssertionError(f"no tile holds pixel {(x, y)}")


def _uniform_scene(tmp_path, name="scene", size=64, res=2.0):
    image = np.full((3, size, size), 100, dtype=np.uint8)
    return write_raster(
        tmp_path / f"{name}.tif",
        image,
        "EPSG:32633",
        from_origin(*ORIGIN, res, res),
        nodata=0,
        descriptions=["red", "green", "blue"],
    )


def _square_lonlat(x0, y0, x1, y1):
    """A UTM 33N rectangle (map coords) as a lon/lat GeoJSON polygon."""
    ring = {"type": "Polygon", "coordinates": [[(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]]}
    return transform_geom("EPSG:32633", "EPSG:4326", ring, precision=12)


@pytest.mark.parametrize("gsd", [None, 1.0])
def test_polygon_label_lands_on_the_right_tile_pixel(tmp_path, gsd):
    image = _uniform_scene(tmp_path)
    # Pixels x 20..29, y 10..19 of the 2 m image, as a lon/lat polygon (a CRS change).
    polygon = _square_lonlat(ORIGIN[0] + 40, ORIGIN[1] - 40, ORIGIN[0] + 60, ORIGIN[1] - 20)
    labels = write_geojson(tmp_path / "labels.geojson", [(polygon, "urban")])
    catalog = write_catalog(tmp_path, [{"scene_id": "a", "image": image.name, "labels": labels.name}])
    overrides = ["tile.size=16", "tile.stride=16"] + ([f"tile.gsd={gsd}"] if gsd else [])
    _run(tmp_path, catalog, *overrides)
    store = SceneTiles(tmp_path / "tiles" / "a")
    urban = 3
    scale = 2 if gsd else 1  # at 1 m every 2 m pixel becomes 2 x 2
    inside = [(20, 10), (29, 19), (25, 15)]
    outside = [(19, 10), (30, 19), (25, 9), (25, 20)]
    for x, y in inside:
        for dx in range(scale):
            assert _label_at(store, x * scale + dx, y * scale + dx) == urban
    for x, y in outside:
        assert _label_at(store, x * scale, y * scale) == IGNORE


def test_raster_label_on_coarser_grid_in_another_zone(tmp_path):
    image = _uniform_scene(tmp_path)
    # Label raster in UTM 34N (another CRS) at 0.5 m: class value 4 (urban) over a region,
    # 2 (forest) elsewhere. Build it by mapping its pixel centres back into the image's CRS.
    width = height = 400
    cx, cy = warp_transform("EPSG:32633", "EPSG:32634", [ORIGIN[0] + 64], [ORIGIN[1] - 64])
    transform = from_origin(cx[0] - 100, cy[0] + 100, 0.5, 0.5)
    cols, rows = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    xs, ys = transform * (cols.ravel(), rows.ravel())
    ux, uy = warp_transform("EPSG:32634", "EPSG:32633", xs, ys)
    px = (np.asarray(ux) - ORIGIN[0]) / 2.0
    py = (ORIGIN[1] - np.asarray(uy)) / 2.0
    inside = (px >= 20) & (px < 30) & (py >= 10) & (py < 20)
    values = np.where(inside, 4, 2).astype(np.uint8).reshape(height, width)
    labels = write_raster(tmp_path / "labels.tif", values, "EPSG:32634", transform, nodata=0)
    catalog = write_catalog(tmp_path, [{"scene_id": "b", "image": image.name, "labels": labels.name}])
    _run(tmp_path, catalog)
    store = SceneTiles(tmp_path / "tiles" / "b")
    for x, y in [(21, 11), (28, 18), (25, 15)]:
        assert _label_at(store, x, y) == 3  # urban is class index 3
    for x, y in [(18, 15), (31, 15), (25, 8), (25, 21)]:
        assert _label_at(store, x, y) == 1  # forest


def test_nodata_tiles_are_dropped_and_masked(tmp_path):
    paths = write_scene(tmp_path, "c", size=(64, 64))
    import rasterio

    with rasterio.open(paths["image"], "r+") as dst:
        data = dst.read()
        data[:, :, :24] = 0  # left 24 columns nodata: tile col 0 all nodata, col 1 half
        dst.write(data)
    catalog = write_catalog(
        tmp_path, [{"scene_id": "c", "image": paths["image"].name, "labels": paths["labels"].name}]
    )
    _, summary = _run(tmp_path, catalog, "tile.max_nodata=0.5")
    store = SceneTiles(tmp_path / "tiles" / "c")
    assert store.index["dropped"] == 4  # the 4 tiles of column 0
    assert summary["tiles"]["c"] == 12
    cols = np.asarray(store.index["tiles"]["col"])
    half = np.flatnonzero(cols == 1)[0]
    assert (store.label(half)[:, :8] == IGNORE).all()
    assert (store.image(half)[:, :, :8] == 0).all()
    assert store.index["tiles"]["nodata"][half] == 0.5


def test_small_scene_is_padded_to_one_tile(tmp_path):
    paths = write_scene(tmp_path, "tiny", size=(12, 12))
    catalog = write_catalog(
        tmp_path, [{"scene_id": "tiny", "image": paths["image"].name, "labels": paths["labels"].name}]
    )
    _run(tmp_path, catalog, "tile.max_nodata=0.5")
    store = SceneTiles(tmp_path / "tiles" / "tiny")
    assert len(store) == 1
    assert store.image(0).shape == (3, 16, 16)
    assert (store.label(0)[12:, :] == IGNORE).all()


def test_shards_round_trip_and_checksums(tmp_path):
    rng = np.random.default_rng(0)
    writer = ShardWriter(tmp_path, shard_mb=1)
    images = rng.random((40, 3, 128, 128), dtype=np.float32)
    labels = rng.integers(0, 5, (40, 128, 128), dtype=np.uint8)
    positions = [writer.add(i, lab) for i, lab in zip(images, labels, strict=True)]
    writer.flush()
    assert len(writer.shards) > 1, "1 MB shards should split 40 tiles of 96 KB"
    write_index(
        tmp_path,
        {
            "tile_size": 128,
            "shards": writer.shards,
            "tiles": {"shard": [p[0] for p in positions], "offset": [p[1] for p in positions]},
        },
    )
    store = SceneTiles(tmp_path)
    for i in range(40):
        np.testing.assert_array_equal(store.image(i), images[i].astype(np.float16))
        np.testing.assert_array_equal(store.label(i), labels[i])
    shard = tmp_path / writer.shards[0]["images"]
    shard.write_bytes(shard.read_bytes()[:-100])  # truncate
    assert "checksum mismatch" in verify_shards(tmp_path, read_index(tmp_path))
    with pytest.raises(TilepipeError, match="checksum"):
        SceneTiles(tmp_path)


def test_shard_checksums_are_xxh3_and_older_sha256_stores_still_verify(tmp_path):
    """New shards carry XXH3-128 checksums of their bytes; an index written before holds SHA-256
    under ``sha256`` and is verified with it, so a damaged old shard is still caught."""
    import hashlib

    import xxhash

    writer = ShardWriter(tmp_path, shard_mb=1)
    writer.add_many(np.arange(2 * 3 * 8 * 8, dtype=np.float32).reshape(2, 3, 8, 8), np.ones((2, 8, 8)))
    writer.flush()
    writer.close()
    (shard,) = writer.shards
    for name, digest in shard["xxh3_128"].items():
        assert digest == xxhash.xxh3_128((tmp_path / name).read_bytes()).hexdigest()
    legacy = {k: v for k, v in shard.items() if k != "xxh3_128"}
    legacy["sha256"] = {n: hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in shard["xxh3_128"]}
    assert verify_shards(tmp_path, {"shards": [legacy]}) is None
    labels = tmp_path / shard["labels"]
    labels.write_bytes(labels.read_bytes()[:-1] + b"\x07")
    assert "checksum mismatch" in verify_shards(tmp_path, {"shards": [legacy]})
    assert "checksum mismatch" in verify_shards(tmp_path, {"shards": [shard]})


def test_tiling_is_incremental_and_rebuilds_corrupt_output(tmp_path, scenes):
    params, first = _run(tmp_path, scenes)
    assert sorted(first["tiled"]) == ["s0", "s1", "s2", "s3"]
    shard = tmp_path / "tiles" / "s0" / "images-00000.npy"
    before = shard.read_bytes()
    assert tile(params, tmp_path / "scenes.json", tmp_path / "tiles")["tiled"] == []
    shard.write_bytes(before[:50])
    assert tile(params, tmp_path / "scenes.json", tmp_path / "tiles")["tiled"] == ["s0"]
    assert shard.read_bytes() == before, "rebuilt shard must be byte-identical"
    paths = write_scene(tmp_path, "s9", seed=9)
    with open(scenes, "a") as fh:
        fh.write(f"s9,{paths['image'].name},{paths['labels'].name},,\n")
    ingest(params, scenes, tmp_path / "scenes.json")
    assert tile(params, tmp_path / "scenes.json", tmp_path / "tiles")["tiled"] == ["s9"]
    summary = json.loads((tmp_path / "tiles" / "summary.json").read_text())
    assert set(summary["tiles"]) == {"s0", "s1", "s2", "s3", "s9"}


def test_parallel_tiling_matches_serial(tmp_path, scenes):
    params, _ = _run(tmp_path, scenes)
    parallel = tiny_params(tmp_path, "tile.workers=2")
    tile(parallel, tmp_path / "scenes.json", tmp_path / "tiles2")
    for scene in ["s0", "s1", "s2", "s3"]:
        a = read_index(tmp_path / "tiles" / scene)
        b = read_index(tmp_path / "tiles2" / scene)
        assert a == b


@pytest.mark.parametrize("res,offset", [(4.0, (0.0, 0.0)), (3.0, (1.3, -0.7)), (0.5, (0.2, 0.1))])
def test_same_crs_label_raster_matches_a_whole_raster_nearest_warp(tmp_path, res, offset):
    """A label raster in the grid's CRS (coarser, finer, shifted, partly off the scene, with nodata)
    lands on every window exactly as GDAL's nearest-neighbour warp of the whole raster does."""
    from rasterio.crs import CRS
    from rasterio.warp import Resampling, reproject
    from rasterio.windows import Window

    from tilepipe.geo.labels import RasterLabels
    from tilepipe.geo.raster_io import Grid

    grid = Grid(CRS.from_epsg(32633), from_origin(500000, 4000000, 1.0, 1.0), 203, 157)
    n = int(260 / res)
    values = np.random.default_rng(0).integers(0, 6, (n, n), dtype=np.uint8)  # 0: nodata
    transform = from_origin(500000 - 30 + offset[0], 4000000 + 20 + offset[1], res, res)
    path = write_raster(tmp_path / "labels.tif", values, "EPSG:32633", transform, nodata=0)
    params = tiny_params(tmp_path)
    reader = RasterLabels(path, grid, params.data)
    assert reader.rectilinear
    want = np.zeros((grid.height, grid.width), np.uint8)
    reproject(values, want, src_transform=transform, src_crs=grid.crs, dst_transform=grid.transform,
              dst_crs=grid.crs, resampling=Resampling.nearest, src_nodata=0, dst_nodata=0)  # fmt: skip
    lut = np.full(256, IGNORE, np.uint8)
    lut[1:6] = np.arange(5)
    for window in (Window(0, 0, 203, 157), Window(-20, 30, 64, 64), Window(150, 120, 100, 90)):
        got = reader.read(window)
        expect = np.full((int(window.height), int(window.width)), IGNORE, np.uint8)
        r0, c0 = max(0, int(window.row_off)), max(0, int(window.col_off))
        r1 = min(grid.height, int(window.row_off + window.height))
        c1 = min(grid.width, int(window.col_off + window.width))
        expect[
            r0 - int(window.row_off) : r1 - int(window.row_off),
            c0 - int(window.col_off) : c1 - int(window.col_off),
        ] = lut[want[r0:r1, c0:c1]]
        assert (got == expect).all()
    reader.close()


@pytest.mark.parametrize(
    ("dtype", "stored", "high"),
    [
        ("uint8", "uint8", 255),
        ("uint16", "uint16", 12000),
        ("int16", "int16", 12000),
        ("float32", "float16", 1.2),
    ],
)
def test_pixels_are_stored_compactly_and_read_as_the_scaled_values(tmp_path, dtype, stored, high):
    """8/16-bit scenes keep their integers in the store; readers see exactly scale_to_unit's values."""
    from tilepipe.geo.raster_io import scale_to_unit
    from tilepipe.tiles.store import PixelEncoding

    rng = np.random.default_rng(1)
    values = rng.uniform(1, high, (3, 40, 48)).astype(dtype)  # some above the scale's top: clipped
    values[:, :, :5] = 0  # nodata columns
    image = write_raster(
        tmp_path / "s.tif", values, "EPSG:32633", from_origin(*ORIGIN, 1, 1), nodata=0,
        descriptions=["red", "green", "blue"],
    )  # fmt: skip
    labels = write_raster(tmp_path / "s_labels.tif", np.full((40, 48), 2, np.uint8), nodata=0,
                          transform=from_origin(*ORIGIN, 1, 1))  # fmt: skip
    catalog = write_catalog(tmp_path, [{"scene_id": "s", "image": image.name, "labels": labels.name}])
    params, _ = _run(tmp_path, catalog, "tile.size=16", "tile.stride=16", "tile.max_nodata=1.0")
    store = SceneTiles(tmp_path / "tiles" / "s")
    assert store.encoding == PixelEncoding.for_source(dtype, params.bands.scale)
    assert store.stored_image(0).dtype == np.dtype(stored)
    expected = scale_to_unit(values, dtype, params.bands.scale)
    low, high = params.bands.scale[dtype]  # scale_to_unit is this float32 arithmetic, bit for bit
    plain = (values.astype(np.float32) - np.float32(low)) * np.float32(1.0 / (high - low))
    np.testing.assert_array_equal(expected, np.clip(plain, 0.0, 1.0))
    expected[:, :, :5] = 0.0
    tiles = np.arange(len(store))
    gathered, _ = store.gather(tiles[::-1])
    for i in tiles:
        x, y = store.index["tiles"]["x"][i], store.index["tiles"]["y"][i]
        want = np.zeros((3, 16, 16), np.float32)  # past the scene's edge: padding, nodata
        part = expected[:, y : y + 16, x : x + 16]
        want[:, : part.shape[1], : part.shape[2]] = part
        got = store.image(int(i))
        assert got.dtype == np.float32
        if stored == "float16":
            np.testing.assert_allclose(got, want, atol=1e-3)
        else:
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(gathered[len(tiles) - 1 - i], got)


def test_integer_range_below_the_dtype_falls_back_to_float16():
    from tilepipe.tiles.store import PixelEncoding

    assert PixelEncoding.for_source("uint8", {"uint8": (-10.0, 245.0)}).dtype == "float16"
    assert PixelEncoding.for_source("uint32", {"uint32": (0.0, 10000.0)}).dtype == "float16"
    assert PixelEncoding.for_source("uint16", {"uint16": (0.0, 10000.0)}).dtype == "uint16"


@pytest.mark.parametrize("n_classes", [3, 5, 9, 12])
def test_tile_histograms_count_each_class_and_ignored_pixels(n_classes):
    """Both ways of counting (compare-and-count for few classes, one bincount for many) agree with
    a per-tile bincount; values that are neither a class nor IGNORE are not counted."""
    from tilepipe.tiles.cutting import _histograms

    rng = np.random.default_rng(n_classes)
    labels = rng.integers(0, n_classes + 3, (17, 64), dtype=np.uint8)  # some values past the classes
    labels[rng.random(labels.shape) < 0.2] = IGNORE
    expected = np.array([np.bincount(row, minlength=256)[[*range(n_classes), IGNORE]] for row in labels])
    np.testing.assert_array_equal(_histograms(labels, n_classes), expected)
    # 256 px tiles of one class: 65536 pixels, one more than 16 bits count
    uniform = np.zeros((2, 256 * 256), dtype=np.uint8)
    uniform[1] = IGNORE
    counts = _histograms(uniform, n_classes)
    assert counts[0, 0] == counts[1, -1] == 256 * 256 and counts.sum() == 2 * 256 * 256


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float16"])
@pytest.mark.parametrize(("size", "stride"), [(8, 8), (6, 6), (8, 5)])
def test_cut_gives_each_tile_its_own_window(dtype, size, stride):
    """Tiles cut from a chunk (bands or not, side by side or overlapping, all or some kept) are the
    chunk's windows at their grid positions, in row-major order."""
    from tilepipe.tiles.cutting import _cut

    nr, nc = 3, 4
    rng = np.random.default_rng(size * stride)
    shape = ((nr - 1) * stride + size, (nc - 1) * stride + size)
    for array in (rng.integers(0, 250, (2, *shape)).astype(dtype), rng.integers(0, 250, shape).astype(dtype)):
        for keep in (np.arange(nr * nc), np.array([0, 5, 11])):
            tiles = _cut(array, size, stride, nc, keep)
            assert tiles.shape == (len(keep), *array.shape[:-2], size, size) and tiles.dtype == array.dtype
            for tile_, k in zip(tiles, keep, strict=True):
                r, c = divmod(int(k), nc)
                window = array[..., r * stride : r * stride + size, c * stride : c * stride + size]
                np.testing.assert_array_equal(tile_, window)


TILE_MEMORY = """
import json, sys
from pathlib import Path
from tilepipe.geo.scenes import read_scene_records
from tilepipe.params import load_params
from tilepipe.tiles.cutting import tile_scene
scenes_json, out, params_file, catalog = sys.argv[1:5]
params = load_params(params_file, json.loads(sys.argv[5]))
scene = read_scene_records(scenes_json)[0]
def status_kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])
open("/proc/self/clear_refs", "w").write("5")  # VmHWM from here: the tiling's own peak
before = status_kb("VmRSS")
tile_scene(scene, params, Path(out))
after = status_kb("VmHWM")
print(json.dumps({"before_kb": before, "after_kb": after}))
"""


def _blocky_scene(folder, name: str, side: int) -> dict:
    """An RGB scene and its label raster, written 512 rows at a time (never whole)."""
    import rasterio
    from rasterio.windows import Window

    origin = from_origin(500000, 4000000, 1, 1)
    grid = {"width": side, "height": side, "crs": "EPSG:32633", "transform": origin}
    common = {"driver": "GTiff", "tiled": True, "blockxsize": 256, "blockysize": 256, **grid}
    image, labels = folder / f"{name}.tif", folder / f"{name}_labels.tif"
    yy, xx = np.mgrid[0:512, 0:side]
    with rasterio.open(image, "w", count=3, dtype="uint8", **common) as img, rasterio.open(
        labels, "w", count=1, dtype="uint8", **common
    ) as lab:
        for band, colour in enumerate(("red", "green", "blue"), start=1):
            img.set_band_description(band, colour)
        for row in range(0, side, 512):
            block = ((xx // 29 + (yy + row) // 31) * 37 % 251 + 1).astype(np.uint8)
            img.write(np.stack([block, 255 - block, block // 2]), window=Window(0, row, side, 512))
            lab.write((block % 5 + 1)[None], window=Window(0, row, side, 512))
    return {"scene_id": name, "image": image.name, "labels": labels.name}


def test_tiling_memory_does_not_grow_with_the_scene(tmp_path):
    """One scene and one four times its area: peak memory grows by a small part of the difference.

    Both are large enough to fill what settings bound (GDAL's 16 MB block cache, the chunks read
    ahead, two 4 MB shards), so what the larger adds would be memory that grows with the scene.
    """
    import subprocess
    import sys

    from tests.conftest import ROOT

    overrides = ["tile.size=64", "tile.stride=64", "tile.shard_mb=4", "tile.gdal_cache_mb=16"]
    growth = {}
    for side in (3072, 6144):
        folder = tmp_path / str(side)
        folder.mkdir()
        catalog = write_catalog(folder, [_blocky_scene(folder, f"s{side}", side)])
        params = tiny_params(folder, *overrides)
        ingest(params, catalog, folder / "scenes.json")
        args = [str(folder / "scenes.json"), str(folder / "tiles"), str(ROOT / "params.yaml"), str(catalog)]
        all_overrides = [f"data.catalog={catalog}", f"data.imagery={folder}", *overrides]
        done = subprocess.run(
            [sys.executable, "-c", TILE_MEMORY, *args, json.dumps(all_overrides)],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        rss = json.loads(done.stdout.strip().splitlines()[-1])
        growth[side] = (rss["after_kb"] - rss["before_kb"]) / 1024
        assert read_index(folder / "tiles")["tile_count"] == (side // 64) ** 2
    extra_mb = (6144**2 - 3072**2) * 4 / 2**20  # the extra pixels: 3 bands and labels, one byte each
    print(f"peak RSS growth {growth} MB; the extra pixels alone take {extra_mb:.0f} MB")
    assert growth[6144] - growth[3072] < extra_mb / 10  # 11 MB of 108 MB


def test_the_gdal_block_cache_is_the_params_megabytes_not_bytes():
    """rasterio gives an integer GDAL_CACHEMAX to GDALSetCacheMax64, which counts bytes.

    With a bare 64 GDAL kept no block at all, and every read across block boundaries (the map's
    overlapping window rows, a tile chunk) decoded its blocks again: 10x the read time measured.
    """
    from rasterio._env import get_gdal_config  # asks GDAL itself (GDALGetCacheMax64)

    from tilepipe.geo.raster_io import gdal_env

    with gdal_env(16):
        assert get_gdal_config("GDAL_CACHEMAX") == 16 * 1024 * 1024
