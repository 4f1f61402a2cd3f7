"""What a map holds: per class its cells and its area in hectares, the nodata share, the mean confidence.

Areas are computed on an equal-area projection, so they are right in any CRS, geographic ones
included: the map's grid is cut into blocks (``block`` px a side, at most :data:`MAX_BLOCKS` along
an axis), each block's corners are projected onto a Lambert azimuthal equal-area projection of the
WGS84 ellipsoid centred on the map (PROJ's ``laea``: areas on it are areas on the ellipsoid), and
the block's area there (the quadrilateral of its projected corners) is spread evenly over its
pixels. A pixel's area varies smoothly (with the cosine of the latitude on a degree grid, with the
scale factor in a UTM zone), so over a block of at most 1/512 of the map it is constant to far
better than 0.1 %.
"""

from __future__ import annotations

import math

import numpy as np
from rasterio.crs import CRS
from rasterio.warp import transform as warp_points

from tilepipe.geo.raster_io import Grid
from tilepipe.mapping.blend import NODATA, Strip

MIN_BLOCK = 8  # px
MAX_BLOCKS = 512  # blocks along the longer axis at most: memory and PROJ calls stay bounded
SQUARE_METRES_PER_HECTARE = 10_000.0


class PixelAreas:
    """The area (m^2, on the ellipsoid) of each pixel of a grid, one row at a time."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.block = max(MIN_BLOCK, math.ceil(max(grid.width, grid.height) / MAX_BLOCKS))
        self.cols = np.unique(np.minimum(np.arange(0, grid.width + self.block, self.block), grid.width))
        cx, cy = grid.transform * (grid.width / 2, grid.height / 2)
        (lon,), (lat,) = warp_points(grid.crs, "EPSG:4326", [cx], [cy])
        self.equal_area = CRS.from_proj4(
            f"+proj=laea +lat_0={lat:.6f} +lon_0={lon:.6f} +datum=WGS84 +units=m +no_defs"
        )
        self._cached: tuple[int, np.ndarray] | None = None

    def _corners(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """Block corners along grid row ``row`` (a pixel edge), projected equal-area."""
        xs, ys = self.grid.transform * (self.cols.astype(np.float64), np.full(len(self.cols), float(row)))
        px, py = warp_points(self.grid.crs, self.equal_area, list(xs), list(ys))
        return np.asarray(px), np.asarray(py)

    def block_row(self, index: int) -> np.ndarray:
        """Per-pixel area (m^2) of each block of block row ``index``, one value per pixel column."""
        if self._cached is not None and self._cached[0] == index:
            return self._cached[1]
        top, bottom = index * self.block, min((index + 1) * self.block, self.grid.height)
        (tx, ty), (bx, by) = self._corners(top), self._corners(bottom)
        # quadrilateral (top-left, top-right, bottom-right, bottom-left): half the cross of its diagonals
        d1x, d1y = bx[1:] - tx[:-1], by[1:] - ty[:-1]
        d2x, d2y = bx[:-1] - tx[1:], by[:-1] - ty[1:]
        area = 0.5 * np.abs(d1x * d2y - d1y * d2x)
        widths = np.diff(self.cols)
        per_pixel = np.repeat(area / (widths * (bottom - top)), widths)
        self._cached = (index, per_pixel)
        return per_pixel


class MapStats:
    """Accumulates a map's strips: cells and area per class, nodata cells, summed top-class probability."""

    def __init__(self, grid: Grid, n_classes: int) -> None:
        self.grid, self.n_classes = grid, n_classes
        self.areas = PixelAreas(grid)
        self.cells = np.zeros(256, dtype=np.int64)
        self.area_m2 = np.zeros(256, dtype=np.float64)
        self.confidence_sum: float | None = None  # None until a strip comes with its probabilities

    def add(self, strip: Strip) -> None:
        """Count a strip (before the writer scales its probabilities in place)."""
        rows, block, row = strip.classes.shape[0], self.areas.block, 0
        while row < rows:  # the rows of one block row share their pixel areas
            index = (strip.row + row) // block
            stop = min(rows, (index + 1) * block - strip.row)
            classes = strip.classes[row:stop].ravel()
            weights = np.tile(self.areas.block_row(index), stop - row)
            self.area_m2 += np.bincount(classes, weights=weights, minlength=256)
            self.cells += np.bincount(classes, minlength=256)
            row = stop
        if strip.probs is not None:
            mapped = strip.classes != NODATA
            top = float(strip.probs.max(axis=0)[mapped].sum(dtype=np.float64))
            self.confidence_sum = (self.confidence_sum or 0.0) + top

    def result(self) -> dict[str, float | list[float] | int]:
        """Per class cells and hectares (index order), nodata cells and share, mean top-class probability."""
        mapped = int(self.cells[: self.n_classes].sum())
        total = self.grid.width * self.grid.height
        hectares = self.area_m2[: self.n_classes] / SQUARE_METRES_PER_HECTARE
        return {
            "class_cells": [int(v) for v in self.cells[: self.n_classes]],
            "class_hectares": [round(float(v), 4) for v in hectares],
            "nodata_cells": total - mapped,
            "nodata_fraction": round(1 - mapped / max(total, 1), 6),
            "mean_confidence": None
            if not mapped or self.confidence_sum is None
            else round(self.confidence_sum / mapped, 6),
        }
