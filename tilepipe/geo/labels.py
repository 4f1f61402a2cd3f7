"""Label layers: label rasters (any grid, any CRS) and GeoJSON polygons, read onto a tile grid."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import CRSError
from rasterio.features import rasterize
from rasterio.warp import transform_bounds, transform_geom
from rasterio.windows import Window

from tilepipe.errors import bad_file
from tilepipe.geo.raster_io import Grid, aligned, check_georeferenced, is_native, open_raster, read_padded
from tilepipe.geo.remote import is_remote, read_remote_bytes
from tilepipe.params import DataParams

IGNORE = 255  # class index stored for unlabelled / nodata pixels in the tile store
GEOJSON_SUFFIXES = (".geojson", ".json")


def is_geojson(path: Path | str) -> bool:
    """True when the label file is GeoJSON (by suffix)."""
    return Path(path).suffix.lower() in GEOJSON_SUFFIXES


def value_lookup(data: DataParams) -> np.ndarray:
    """A 256-entry table: label-raster value -> class index (IGNORE where unknown)."""
    lut = np.full(256, IGNORE, dtype=np.uint8)
    for index, cls in enumerate(data.classes):
        lut[cls.value] = index
    return lut


def background_index(data: DataParams) -> int:
    """Class index for pixels outside every polygon (IGNORE unless params name a class)."""
    return IGNORE if data.background == "ignore" else data.class_names.index(data.background)


def scan_label_raster(path: Path, data: DataParams) -> tuple[set[int], tuple, CRS]:
    """Check a label raster: integer, georeferenced, values all known. Returns (values, bounds, crs)."""
    with open_raster(path) as src:
        check_georeferenced(src)
        if src.dtypes[0] not in ("uint8", "int8", "uint16", "int16", "uint32", "int32"):
            raise bad_file(path, f"label raster must hold integer classes, not {src.dtypes[0]}")
        known = {c.value for c in data.classes}
        seen: set[int] = set()
        for _, window in src.block_windows(1):
            block = src.read(1, window=window, masked=True)
            seen.update(int(v) for v in np.unique(block.compressed()))
        unknown = sorted(seen - known)
        if unknown:
            raise bad_file(
                path, f"label values {unknown[:10]} are not classes in params (known: {sorted(known)})"
            )
        return seen, tuple(src.bounds), src.crs


def _geojson_crs(doc: dict[str, Any], path: Path) -> CRS:
    """GeoJSON is lon/lat (RFC 7946) unless a legacy ``crs`` member names another CRS."""
    name = (doc.get("crs") or {}).get("properties", {}).get("name")
    if not name:
        return CRS.from_epsg(4326)
    try:
        return CRS.from_user_input(name)
    except CRSError:
        raise bad_file(path, f"unknown crs {name!r}") from None


def load_polygons(path: Path, data: DataParams) -> tuple[list[tuple[dict, int]], CRS]:
    """Read and validate GeoJSON labels: [(geometry, class index)] in the file's CRS."""
    try:
        doc = json.loads(read_remote_bytes(path) if is_remote(path) else Path(path).read_bytes())
    except FileNotFoundError:
        raise bad_file(path, "file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_file(path, f"not valid GeoJSON ({exc})") from None
    features = doc.get("features") if isinstance(doc, dict) else None
    if not isinstance(features, list):
        raise bad_file(path, "not a GeoJSON FeatureCollection")
    if not features:
        raise bad_file(path, "GeoJSON holds no features, so the scene has no labels")
    by_name = {c.name: i for i, c in enumerate(data.classes)}
    by_value = {c.value: i for i, c in enumerate(data.classes)}
    shapes: list[tuple[dict, int]] = []
    for number, feature in enumerate(features):
        props = feature.get("properties") or {}
        if "class" not in props:
            raise bad_file(path, f"feature {number} has no `class` attribute")
        label = props["class"]
        index = by_name.get(label) if isinstance(label, str) else by_value.get(label)
        if index is None and isinstance(label, str) and label.isdigit():
            index = by_value.get(int(label))
        if index is None:
            raise bad_file(path, f"feature {number}: class {label!r} is not a class in params")
        geometry = feature.get("geometry")
        try:
            geom = shapely.geometry.shape(geometry)
        except (AttributeError, TypeError, ValueError, shapely.errors.GEOSException):
            raise bad_file(path, f"feature {number} has a malformed geometry") from None
        if not geom.is_valid:
            reason = shapely.is_valid_reason(geom)
            raise bad_file(path, f"feature {number} has an invalid geometry ({reason})")
        shapes.append((geometry, index))
    return shapes, _geojson_crs(doc, path)


def polygons_bounds(shapes: list[tuple[dict, int]]) -> tuple[float, float, float, float]:
    """Bounding box of all polygons, in their CRS."""
    boxes = np.array([shapely.geometry.shape(g).bounds for g, _ in shapes])
    return boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max()


class RasterLabels:
    """A label raster resampled (nearest neighbour) onto the tile grid.

    A raster in the grid's CRS with north-up pixels (the common case: labels drawn on the scene
    or a coarser copy of its grid) is read at its own resolution and its pixels repeated by index,
    as GDAL's nearest-neighbour warp picks them; anything else goes through a warped VRT.
    """

    def __init__(self, path: Path, grid: Grid, data: DataParams) -> None:
        self.src = open_raster(path)
        self.lut = value_lookup(data)
        self.nodata = self.src.nodata
        self.grid = grid
        self.rectilinear = (
            not is_native(self.src, grid)
            and self.src.crs == grid.crs
            and _north_up(self.src.transform)
            and _north_up(grid.transform)
        )
        self.view = self.src if self.rectilinear else aligned(self.src, grid, Resampling.nearest)

    def read(self, window: Window) -> np.ndarray:
        """Class indexes for ``window`` of the grid (IGNORE off the label raster or at nodata)."""
        if self.rectilinear:
            return self._gather(window)
        values, valid = read_padded(self.view, window, [1])
        return self._classes(values[0], valid)

    def _classes(self, values: np.ndarray, valid: np.ndarray) -> np.ndarray:
        if values.dtype != np.uint8:
            values = np.clip(values, 0, 255).astype(np.uint8)
        out = self.lut.take(values)
        out[~valid] = IGNORE
        return out

    def _gather(self, window: Window) -> np.ndarray:
        """Nearest source pixel of every grid pixel centre, from one read of the source pixels used.

        Classes are looked up at the source's resolution and only then repeated onto the grid:
        with labels coarser than the scene that is many times less work than the other way round.
        """
        g, s = self.grid.transform, self.src.transform
        shape = (int(window.height), int(window.width))
        grid_rows = np.arange(int(window.row_off), int(window.row_off) + shape[0])
        grid_cols = np.arange(int(window.col_off), int(window.col_off) + shape[1])
        rows = _source_index(grid_rows, g.f, g.e, s.f, s.e)
        cols = _source_index(grid_cols, g.c, g.a, s.c, s.a)
        # a pixel counts when it is on the grid (as with the warped VRT) and on the label raster
        in_rows = (rows >= 0) & (rows < self.src.height) & (grid_rows >= 0) & (grid_rows < self.grid.height)
        in_cols = (cols >= 0) & (cols < self.src.width) & (grid_cols >= 0) & (grid_cols < self.grid.width)
        if not in_rows.any() or not in_cols.any():
            return np.full(shape, IGNORE, dtype=np.uint8)
        r0, r1 = int(rows[in_rows].min()), int(rows[in_rows].max()) + 1
        c0, c1 = int(cols[in_cols].min()), int(cols[in_cols].max()) + 1
        block, ok = read_padded(self.src, Window(c0, r0, c1 - c0, r1 - r0), [1])
        classes = self._classes(block[0], ok)
        ri, ci = np.clip(rows, r0, r1 - 1) - r0, np.clip(cols, c0, c1 - 1) - c0
        # two 1-d gathers (far faster than one 2-d): whole rows are cheap to copy, single pixels are not,
        # so gather columns while there are the fewest rows
        if len(ri) >= len(classes):
            out = classes.take(ci, axis=1).take(ri, axis=0)
        else:
            out = classes.take(ri, axis=0).take(ci, axis=1)
        out[~in_rows] = IGNORE
        out[:, ~in_cols] = IGNORE
        return out

    def close(self) -> None:
        """Release the datasets."""
        if self.view is not self.src:
            self.view.close()
        self.src.close()


def _north_up(transform) -> bool:
    return transform.b == 0 and transform.d == 0 and transform.a > 0 and transform.e < 0


def _source_index(positions: np.ndarray, origin: float, res: float, src_origin: float, src_res: float):
    """Source pixel index holding each grid pixel centre along one axis (GDAL's nearest rule)."""
    centres = origin + (positions + 0.5) * res
    return np.floor((centres - src_origin) / src_res + 1e-10).astype(np.int64)


class PolygonLabels:
    """GeoJSON polygons rasterised (pixel centres) onto windows of the tile grid."""

    def __init__(self, path: Path, grid: Grid, data: DataParams) -> None:
        shapes, crs = load_polygons(path, data)
        self.grid = grid
        self.fill = background_index(data)
        self.shapes = [(transform_geom(crs, grid.crs, g), i) for g, i in shapes]
        self.boxes = np.array([shapely.geometry.shape(g).bounds for g, _ in self.shapes])

    def read(self, window: Window) -> np.ndarray:
        """Class indexes for ``window``; later polygons win where they overlap."""
        left, bottom, right, top = self.grid.window_bounds(window)
        hit = (
            (self.boxes[:, 0] <= right)
            & (self.boxes[:, 2] >= left)
            & (self.boxes[:, 1] <= top)
            & (self.boxes[:, 3] >= bottom)
        )
        shape = (int(window.height), int(window.width))
        chosen = [self.shapes[i] for i in np.flatnonzero(hit)]
        if not chosen:
            return np.full(shape, self.fill, dtype=np.uint8)
        return rasterize(
            chosen,
            out_shape=shape,
            transform=self.grid.window_transform(window),
            fill=self.fill,
            dtype="uint8",
        )

    def close(self) -> None:
        """Nothing to release."""


def open_labels(path: Path, grid: Grid, data: DataParams) -> RasterLabels | PolygonLabels:
    """Open a label layer of either kind onto ``grid``."""
    return PolygonLabels(path, grid, data) if is_geojson(path) else RasterLabels(path, grid, data)


def label_bounds_in(path: Path, data: DataParams, crs: CRS) -> tuple[float, float, float, float]:
    """Validate a label layer and return its bounds in ``crs`` (to check overlap with the image)."""
    if is_geojson(path):
        shapes, src_crs = load_polygons(path, data)
        return transform_bounds(src_crs, crs, *polygons_bounds(shapes))
    _, bounds, src_crs = scan_label_raster(path, data)
    return transform_bounds(src_crs, crs, *bounds)
