"""Property-based: over tile size, stride, ground resolution and scene geometry (size, pixel size,
origin, a nodata rectangle), the tiles cover every valid pixel and every label lands where it belongs.

The label raster is a deterministic function of the ground coordinate (class blocks of ``block``
source pixels), so each tile's label pixels are checked against that function at the tile's own
georeferenced pixel centres. Pixels whose footprint straddles a block, nodata or scene edge
(where resampling may legitimately go either way) are not judged.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rasterio.transform import from_origin

from tests.conftest import tiny_params, write_catalog, write_raster
from tilepipe.geo.labels import IGNORE
from tilepipe.stages.ingest import ingest
from tilepipe.stages.tile import tile
from tilepipe.tiles.store import SceneTiles

VALUE = 200  # every valid image pixel: any resampling of valid pixels gives it back


@st.composite
def cases(draw) -> dict:
    """A scene, its nodata rectangle and the tiling params."""
    width, height = draw(st.integers(8, 64)), draw(st.integers(8, 64))
    res = draw(st.sampled_from([0.5, 1.0, 2.0, 3.0]))
    c0, c1 = sorted(draw(st.tuples(st.integers(0, width), st.integers(0, width))))
    r0, r1 = sorted(draw(st.tuples(st.integers(0, height), st.integers(0, height))))
    if (c1 - c0) * (r1 - r0) >= width * height:  # never a scene that is all nodata
        c1 = c0 + (c1 - c0) // 2
    size = draw(st.integers(6, 24))
    factor = draw(st.sampled_from([None, None, 0.5, 0.75, 1.5, 2.0, 3.0]))  # tile.gsd / pixel size
    return {
        "width": width,
        "height": height,
        "res": res,
        "origin": (
            500000.0 + draw(st.integers(-400, 400)) * 0.25,
            4000000.0 + draw(st.integers(-400, 400)) * 0.25,
        ),
        "nodata": (c0, c1, r0, r1),
        "block": draw(st.integers(2, 6)),
        "size": size,
        "stride": draw(st.integers((size + 1) // 2, size)),
        "gsd": None if factor is None else res * factor,
        "max_nodata": draw(st.sampled_from([1.0, 0.5, 0.2])),
    }


def _class_value(c: np.ndarray, r: np.ndarray, block: int) -> np.ndarray:
    return ((c // block) + 2 * (r // block)) % 5 + 1


def _write(folder: Path, case: dict) -> Path:
    width, height, (c0, c1, r0, r1) = case["width"], case["height"], case["nodata"]
    transform = from_origin(*case["origin"], case["res"], case["res"])
    image = np.full((3, height, width), VALUE, dtype=np.uint8)
    image[:, r0:r1, c0:c1] = 0
    rows, cols = np.mgrid[0:height, 0:width]
    labels = _class_value(cols, rows, case["block"]).astype(np.uint8)
    write_raster(
        folder / "a.tif", image, transform=transform, nodata=0, descriptions=["red", "green", "blue"]
    )
    write_raster(folder / "a_labels.tif", labels, transform=transform, nodata=0)
    return write_catalog(folder, [{"scene_id": "a", "image": "a.tif", "labels": "a_labels.tif"}])


def _truth(case: dict, xs: np.ndarray, ys: np.ndarray, half: float) -> tuple[np.ndarray, np.ndarray]:
    """At ground points (pixel centres, pixel half-size ``half``): state 1 surely valid, 0 surely
    nodata or off the scene, -1 unsure; and the expected class index (-1 where unsure)."""
    (x0, y0), res, w, h = case["origin"], case["res"], case["width"], case["height"]
    c0, c1, r0, r1 = case["nodata"]
    reach = half + res  # the pixel's footprint plus one source pixel (the bilinear kernel)
    cl, ch = np.floor((xs - reach - x0) / res), np.floor((xs + reach - x0) / res)
    rl, rh = np.floor((y0 - ys - reach) / res), np.floor((y0 - ys + reach) / res)
    inside = (cl >= 0) & (ch < w) & (rl >= 0) & (rh < h)
    touches_nodata = (cl < c1) & (ch >= c0) & (rl < r1) & (rh >= r0)
    off_scene = (ch < 0) | (cl >= w) | (rh < 0) | (rl >= h)
    in_nodata = (cl >= c0) & (ch < c1) & (rl >= r0) & (rh < r1)
    state = np.where(inside & ~touches_nodata, 1, np.where(off_scene | in_nodata, 0, -1))
    eps = 1e-6 * res  # a centre on a source pixel edge may go to either side: both must agree
    cols = [np.floor((xs + d - x0) / res).astype(int) for d in (-eps, eps)]
    rows = [np.floor((y0 - ys + d) / res).astype(int) for d in (-eps, eps)]
    values = {_class_value(c, r, case["block"]).tobytes() for c in cols for r in rows}
    expected = _class_value(cols[0], rows[0], case["block"]) - 1
    if len(values) > 1:
        same = np.all([_class_value(c, r, case["block"]) - 1 == expected for c in cols for r in rows], axis=0)
        expected = np.where(same, expected, -1)
    return state, np.where(state == 1, expected, -1)


def _check(case: dict, folder: Path) -> None:
    params = tiny_params(
        folder,
        f"tile.size={case['size']}",
        f"tile.stride={case['stride']}",
        f"tile.max_nodata={case['max_nodata']}",
        *([f"tile.gsd={case['gsd']}"] if case["gsd"] else []),
    )
    ingest(params, _write(folder, case), folder / "scenes.json")
    tile(params, folder / "scenes.json", folder / "tiles")
    store = SceneTiles(folder / "tiles" / "a")
    index, size, stride = store.index, case["size"], case["stride"]
    a, _, left, _, e, top = index["transform"]
    width, height = index["width"], index["height"]
    gsd = case["gsd"] or case["res"]
    assert abs(a - gsd) < 1e-9 and abs(-e - gsd) < 1e-9
    (x0, y0), res = case["origin"], case["res"]
    assert left <= x0 + 1e-6 and top >= y0 - 1e-6, "the grid starts at the scene's corner"
    assert left + width * a >= x0 + case["width"] * res - 1e-6, "the grid reaches the scene's right edge"
    assert top + height * e <= y0 - case["height"] * res + 1e-6, "the grid reaches the scene's bottom edge"

    # Tile origins: multiples of the stride, the last tile reaching the grid's edge.
    xs = list(range(0, max(width - size, 0) + stride, stride))
    ys = list(range(0, max(height - size, 0) + stride, stride))
    assert xs[-1] + size >= width and ys[-1] + size >= height
    grid_tiles = {(x, y) for x in xs for y in ys}
    kept = list(zip(index["tiles"]["x"], index["tiles"]["y"], strict=True))
    assert set(kept) <= grid_tiles and len(set(kept)) == len(kept)
    assert len(grid_tiles) - len(kept) == index["dropped"]
    if case["max_nodata"] == 1.0:
        assert set(kept) == grid_tiles

    jj, ii = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5)
    limit = case["max_nodata"] * size * size + 1e-6
    for x, y in sorted(grid_tiles):
        bx, by = left + (x + jj) * a, top + (y + ii) * e  # the tile's georeferenced pixel centres
        state, expected = _truth(case, bx, by, gsd / 2)
        beyond = (x + jj >= width) | (y + ii >= height)  # padding past the grid: nodata
        assert not (beyond & (state == 1)).any(), "a valid pixel lies beyond the grid"
        state = np.where(beyond, 0, state)
        if (x, y) not in kept:
            assert (state != 1).sum() > limit, f"tile {(x, y)} dropped with too little nodata"
            continue
        i = kept.index((x, y))
        assert store.index["tiles"]["bounds"][i] == [
            round(v, 6) for v in (left + x * a, top + (y + size) * e, left + (x + size) * a, top + y * e)
        ]
        assert (state == 0).sum() <= limit, f"tile {(x, y)} kept with too much nodata"
        label, image = store.label(i), store.image(i).astype(np.float32)
        assert (label[state == 0] == IGNORE).all() and (image[:, state == 0] == 0).all()
        judged = expected >= 0
        np.testing.assert_array_equal(label[judged], expected[judged], err_msg=f"labels of tile {(x, y)}")
        assert np.allclose(image[:, state == 1], np.float16(VALUE / 255), atol=1e-3)


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_tiles_cover_the_valid_area_and_labels_land_in_place(case):
    with tempfile.TemporaryDirectory() as folder:
        _check(case, Path(folder))
