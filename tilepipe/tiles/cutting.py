"""Cutting one scene into tiles with windowed reads, labels aligned onto each tile.

Work is incremental: a scene whose fingerprint (content hashes + tile params) matches its
existing, checksum-verified output is not tiled again (``plan``).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.windows import Window

from tilepipe.errors import TilepipeError
from tilepipe.fsutil import atomic_dir, is_leftover, write_json
from tilepipe.geo.aoi import AoiMask, geometry_sha256
from tilepipe.geo.labels import IGNORE, open_labels
from tilepipe.geo.raster_io import (
    aligned,
    gdal_env,
    open_raster,
    read_ahead,
    read_padded,
    target_grid,
)
from tilepipe.geo.read_errors import is_transient_read_error, read_remote_again, unreadable_window
from tilepipe.geo.remote import as_location, is_remote
from tilepipe.geo.scenes import SceneRecord
from tilepipe.params import Params
from tilepipe.tiles.store import PixelEncoding, ShardWriter, read_index, verify_shards, write_index

STORE_VERSION = 3  # 2: 8/16-bit pixels stored as read (PixelEncoding); 3: XXH3-128 shard checksums
T = TypeVar("T")
CHUNK_PX = 1024  # tiles are cut from reads of about this many pixels a side
TABLE_COLUMNS = ("shard", "offset", "row", "col", "x", "y", "bounds", "nodata", "hist")


def fingerprint(scene: SceneRecord, params: Params) -> str:
    """Key of a scene's tile output: its content hashes and every param that shapes the tiles."""
    key = {
        "version": STORE_VERSION,
        "image": scene.image_sha256,
        "labels": scene.labels_sha256,
        "input_bands": scene.input_bands,
        "scale": params.bands.scale.get(scene.dtype),
        "tile": params.tile.model_dump(mode="json", exclude={"workers", "gdal_cache_mb"}),
        "classes": params.data.model_dump(mode="json", include={"classes", "background"}),
    }
    if scene.aoi_geometry is not None:  # only then: scenes without an AOI keep their fingerprints
        key["aoi"] = geometry_sha256(scene.aoi_geometry)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def tile_grid_shape(width: int, height: int, size: int, stride: int) -> tuple[int, int]:
    """(rows, cols) of tiles so that the last tile reaches the grid's edge."""
    rows = math.ceil(max(height - size, 0) / stride) + 1
    cols = math.ceil(max(width - size, 0) / stride) + 1
    return rows, cols


def is_current(scene_dir: Path, expected: str) -> bool:
    """True when a scene's output exists, carries ``expected`` fingerprint and verifies."""
    if not (scene_dir / "index.json").is_file():
        return False
    try:
        index = read_index(scene_dir)
    except TilepipeError:
        return False
    return index.get("fingerprint") == expected and verify_shards(scene_dir, index) is None


def tile_scene(scene: SceneRecord, params: Params, scene_dir: Path) -> dict[str, Any]:
    """Tile one scene into ``scene_dir`` (written whole to a temp dir, then renamed)."""
    tp = params.tile
    started = time.perf_counter()
    with gdal_env(tp.gdal_cache_mb), open_raster(scene.image) as src, atomic_dir(scene_dir) as tmp:
        grid = target_grid(src, tp.gsd)
        coarser = tp.gsd is not None and tp.gsd > scene.gsd_m
        view = aligned(src, grid, Resampling.average if coarser else Resampling.bilinear)
        labels = open_labels(as_location(scene.labels), grid, params.data)
        aoi = None if scene.aoi_geometry is None else AoiMask(scene.aoi_geometry, scene.crs, grid)
        indexes = list(scene.input_bands.values())
        rows, cols = tile_grid_shape(grid.width, grid.height, tp.size, tp.stride)
        step = max(1, CHUNK_PX // tp.stride)
        scale = params.bands.scale
        encoding = PixelEncoding.for_source(scene.dtype, scale)
        writer = ShardWriter(tmp, tp.shard_mb, encoding.dtype)
        table: dict[str, list[np.ndarray]] = {k: [] for k in TABLE_COLUMNS}
        dropped = 0
        corners = _corners(rows, cols, step)
        windows = [(r0, c0, min(step, rows - r0), min(step, cols - c0)) for r0, c0 in corners]

        def read(r0: int, c0: int, nr: int, nc: int) -> _Chunk:
            size, stride = tp.size, tp.stride
            window = Window(c0 * stride, r0 * stride, (nc - 1) * stride + size, (nr - 1) * stride + size)
            raw, valid = _read_image(view, window, indexes, scene)
            image, whole = encoding.encode(raw, scene.dtype, scale), bool(valid.all())
            if not whole:
                image[:, ~valid] = encoding.nodata
            return _Chunk(image, window, valid, whole, r0, c0, nr, nc)

        try:
            # one thread reads the image ahead while this one reads labels, cuts and queues the tiles
            with closing(read_ahead(read, windows, tp.gdal_cache_mb)) as chunks:
                for chunk in chunks:
                    label = _read_labels(labels, chunk.window, scene)
                    if aoi is not None:  # outside the AOI: no label, and nodata for tile.max_nodata
                        inside = aoi.inside(chunk.window)
                        chunk.valid, chunk.whole = chunk.valid & inside, chunk.whole and bool(inside.all())
                    if not chunk.whole:
                        label[~chunk.valid] = IGNORE
                    dropped += _cut_chunk(chunk, label, params, grid, writer, table)
            writer.flush()
        finally:
            writer.close()
            labels.close()
            if view is not src:
                view.close()
        index = _scene_index(scene, params, grid, encoding, table, dropped)
        write_index(tmp, {**index, "shards": writer.shards, "tiles": _tile_table(table)})
    return {**index, "seconds": round(time.perf_counter() - started, 3)}


def _corners(rows: int, cols: int, step: int) -> list[tuple[int, int]]:
    """Top-left tile (row, col) of every chunk of ``step`` x ``step`` tiles, row by row."""
    return [(r0, c0) for r0 in range(0, rows, step) for c0 in range(0, cols, step)]


def _scene_index(
    scene: SceneRecord, params: Params, grid, encoding: PixelEncoding, table: dict, dropped: int
) -> dict[str, Any]:
    """The scene-level fields of ``index.json``: grid, tiling, bands, classes, pixel encoding, counts."""
    return {
        "scene_id": scene.scene_id,
        "fingerprint": fingerprint(scene, params),
        "crs": grid.crs.to_string(),
        "transform": list(grid.transform)[:6],
        "width": grid.width,
        "height": grid.height,
        "tile_size": params.tile.size,
        "stride": params.tile.stride,
        "bands": params.bands.input,
        "classes": params.data.class_names,
        "pixels": asdict(encoding),
        "tile_count": sum(len(piece) for piece in table["shard"]),
        "dropped": dropped,
    }


def _read_or_explain(read: Callable[[], T], location: str, window: Window, scene_id: str) -> T:
    """``read()``, or why not.

    A failure on the way is raised for a retry of the scene (the flow's retry condition); a remote
    file is read once more while its store answers; damaged data is one line naming the file.
    """
    try:
        return read()
    except RasterioError as exc:
        if is_transient_read_error(exc):
            raise
        if not is_remote(location):
            raise unreadable_window(location, window, exc, scene_id) from None
        try:
            return read_remote_again(location, exc, read)
        except RasterioError as again:
            raise unreadable_window(location, window, again, scene_id) from None


def _read_image(
    view, window: Window, indexes: list[int], scene: SceneRecord
) -> tuple[np.ndarray, np.ndarray]:
    """Pixels and validity of a window of the scene's image."""
    return _read_or_explain(lambda: read_padded(view, window, indexes), scene.image, window, scene.scene_id)


def _read_labels(labels, window: Window, scene: SceneRecord) -> np.ndarray:
    """Class indexes of a window; damaged label data is one line naming the label file."""
    return _read_or_explain(lambda: labels.read(window), scene.labels, window, scene.scene_id)


@dataclass
class _Chunk:
    """One read of the grid holding nr x nc tiles whose top-left tile is (r0, c0)."""

    image: np.ndarray
    window: Window
    valid: np.ndarray
    whole: bool  # every pixel valid
    r0: int
    c0: int
    nr: int
    nc: int


def _tile_views(array: np.ndarray, size: int, stride: int, nr: int, nc: int) -> np.ndarray:
    """(..., nr, nc, size, size) strided view of the tile grid in the last two axes (no copy)."""
    view = np.lib.stride_tricks.sliding_window_view(array, (size, size), axis=(-2, -1))
    return view[..., : (nr - 1) * stride + 1 : stride, : (nc - 1) * stride + 1 : stride, :, :]


def _cut(array: np.ndarray, size: int, stride: int, nc: int, keep: np.ndarray) -> np.ndarray:
    """Tiles ``keep`` (row-major in a grid ``nc`` wide) of a (bands,) y, x read: (n, (bands,) size, size)."""
    nr, lead = (array.shape[-2] - size) // stride + 1, array.ndim - 2
    if stride != size:  # overlapping tiles: gather through the strided view
        r, c = np.divmod(keep, nc)
        views = _tile_views(array, size, stride, nr, nc)  # (bands,) nr, nc, size, size
        return np.moveaxis(views, tuple(range(lead)), tuple(range(2, 2 + lead)))[r, c]
    # side-by-side tiles: one transposing copy, moving each tile row (``size`` pixels) as one opaque
    # element: numpy's copy then runs its inner loop over a tile's rows, not over a row's pixels
    rows = np.ascontiguousarray(array).view(f"V{size * array.itemsize}")  # (bands,) y, nc
    grid = np.moveaxis(rows.reshape(*array.shape[:-2], nr, size, nc), (lead, lead + 2), (0, 1))
    tiles = np.ascontiguousarray(grid).view(array.dtype).reshape(nr * nc, *array.shape[:-2], size, size)
    return tiles if len(keep) == nr * nc else tiles[keep]


def _histograms(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-tile counts of each class and of ignored pixels, for (tiles, pixels) labels."""
    if n_classes < 8:  # a few compare-and-sum passes beat one bincount over int64 keys
        # summing into the narrowest type that holds a tile's pixel count is ~3x count_nonzero's speed
        total = np.uint16 if labels.shape[1] <= np.iinfo(np.uint16).max else np.uint32
        values = (*range(n_classes), IGNORE)
        return np.stack([(labels == v).sum(axis=1, dtype=total) for v in values], axis=1)
    first = (np.arange(len(labels), dtype=np.int64) * 256)[:, None]  # one bincount: tile k's values at 256 k
    counts = np.bincount((labels.astype(np.int64) + first).ravel(), minlength=len(labels) * 256)
    counts = counts.reshape(len(labels), 256)
    return np.concatenate([counts[:, :n_classes], counts[:, IGNORE : IGNORE + 1]], axis=1)


def _cut_chunk(
    chunk: _Chunk, label: np.ndarray, params: Params, grid, writer: ShardWriter, table: dict
) -> int:
    """Cut the tiles of one chunk, keep those with little nodata; returns how many were dropped.

    ``table`` gets one array per column for the chunk's kept tiles (see ``_tile_table``).
    Vectorised over the chunk's tile grid; the values (and so ``index.json``) are exactly those of
    a per-tile loop: nodata fraction as ``1 - mean(valid)``, bounds from the grid's affine transform.
    """
    tp, n_classes, size, stride = params.tile, len(params.data.classes), params.tile.size, params.tile.stride
    if chunk.whole:
        nodata = np.zeros(chunk.nr * chunk.nc)
    else:
        views = _tile_views(chunk.valid, size, stride, chunk.nr, chunk.nc)
        valid_px = views.sum(axis=(-2, -1), dtype=np.int64)
        nodata = 1.0 - valid_px.ravel() / float(size * size)
    keep = np.flatnonzero(~(nodata > tp.max_nodata))
    if len(keep) == 0:
        return chunk.nr * chunk.nc
    r, c = np.divmod(keep, chunk.nc)
    images, labels = (_cut(a, size, stride, chunk.nc, keep) for a in (chunk.image, label))
    shards, offsets = writer.add_many(images, labels)
    hist = _histograms(labels.reshape(len(keep), -1), n_classes)
    row, col = chunk.r0 + r, chunk.c0 + c
    px, py = col * stride, row * stride
    a, b, xoff, d, e, yoff = grid.transform[:6]
    # as rasterio.windows.bounds: (left, bottom) = T * (x, y + size), (right, top) = T * (x + size, y)
    left, bottom = px * a + (py + size) * b + xoff, px * d + (py + size) * e + yoff
    right, top = (px + size) * a + py * b + xoff, (px + size) * d + py * e + yoff
    corners = np.stack([left, bottom, right, top], axis=1)
    if not np.all(corners % 1 == 0):  # round(v, 6) leaves whole numbers (metre grids) as they are
        corners = np.array([[round(v, 6) for v in box] for box in corners.tolist()], dtype=np.float64)
    nodata = nodata[keep] if chunk.whole else np.array([round(v, 4) for v in nodata[keep].tolist()])
    columns = (shards, offsets, row, col, px, py, corners, nodata, hist)
    for name, values in zip(TABLE_COLUMNS, columns, strict=True):
        table[name].append(values)
    return chunk.nr * chunk.nc - len(keep)


def _tile_table(table: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray | list]:
    """The index's per-tile columns, joined from per-chunk arrays.

    Arrays, not per-tile Python lists: the index writer serialises them directly, and a 16384 px
    scene's 65536 tiles no longer make ~130 thousand small lists for the garbage collector to walk.
    """
    return {name: np.concatenate(pieces) if pieces else [] for name, pieces in table.items()}


def plan(scenes: list[SceneRecord], params: Params, out_dir: Path) -> list[SceneRecord]:
    """The scenes whose tiles are missing, stale or corrupt."""
    return [s for s in scenes if not is_current(out_dir / s.scene_id, fingerprint(s, params))]


def prune_stale(scenes: list[SceneRecord], out_dir: Path) -> None:
    """Remove scene folders of scenes no longer in the catalog, and what a killed run left behind."""
    wanted = {s.scene_id for s in scenes}
    for stale in out_dir.iterdir():
        if stale.is_dir() and stale.name not in wanted:
            shutil.rmtree(stale)
        elif is_leftover(stale):
            stale.unlink()


def write_summary(
    scenes: list[SceneRecord], out_dir: Path, known: dict[str, int] | None = None
) -> dict[str, int]:
    """Write ``summary.json`` (tile count per scene) once every scene is tiled; returns the counts.

    ``known`` holds the counts of scenes just tiled, whose (large) indexes need not be read back.
    """
    ids, known = [s.scene_id for s in scenes], known or {}
    counts = {i: known[i] if i in known else read_index(out_dir / i)["tile_count"] for i in ids}
    write_json(out_dir / "summary.json", {"scenes": len(scenes), "tiles": counts})
    return counts
