"""A scene opened for prediction on the model's grid and bands, and the grid of the map it gives."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.enums import Resampling
from rasterio.transform import Affine

from tilepipe.errors import bad_file
from tilepipe.geo.bands import parse_band_mapping, resolve_bands
from tilepipe.geo.raster_io import (
    Grid,
    aligned,
    check_georeferenced,
    ground_resolution,
    open_raster,
    read_padded,
    scale_to_unit,
    target_grid,
)
from tilepipe.geo.remote import as_location
from tilepipe.mapping.blend import cell_grid_shape
from tilepipe.ml.checkpoint import ModelMeta

COLOURS = {
    "water": (31, 120, 180),
    "forest": (51, 160, 44),
    "cropland": (255, 217, 47),
    "urban": (227, 26, 28),
    "bare": (191, 154, 110),
}
PALETTE = [(166, 206, 227), (178, 223, 138), (251, 154, 153), (253, 191, 111), (202, 178, 214),
           (255, 127, 0), (106, 61, 154), (177, 89, 40), (128, 128, 128), (0, 128, 128)]  # fmt: skip


def class_colours(classes: list[str]) -> list[tuple[int, int, int]]:
    """An RGB colour per class: fixed ones for the usual land-cover names, a palette for the rest."""
    return [COLOURS.get(name.lower(), PALETTE[i % len(PALETTE)]) for i, name in enumerate(classes)]


@dataclass
class SceneView:
    """A scene opened for prediction: pixels on the model's grid, the model's bands, its dtype."""

    path: Path
    view: Any  # the dataset or a WarpedVRT on the model's ground resolution
    grid: Grid
    indexes: list[int]
    dtype: str
    scale: dict[str, Any]

    def read(self, window) -> tuple[np.ndarray, np.ndarray]:
        """A window (may pass the edge) as float32 bands in [0, 1], zero where invalid, and its mask."""
        raw, valid = read_padded(self.view, window, self.indexes)
        image = scale_to_unit(raw, self.dtype, self.scale)
        np.copyto(image, np.float32(0), where=~valid)  # 5x faster than boolean-index assignment
        return image, valid


@contextmanager
def open_scene(path: Path | str, meta: ModelMeta, bands: str | dict[str, int] | None = None):
    """Open a scene whose bands fit the model, on the model's grid; a misfit is a one-line error."""
    path = as_location(path)
    with open_raster(path) as src:
        check_georeferenced(src)
        dtype = src.dtypes[0]
        if dtype not in meta.scale:
            raise bad_file(
                path, f"dtype {dtype} is not one the model knows how to scale ({', '.join(meta.scale)})"
            )
        mapping = dict(bands) if isinstance(bands, dict) else parse_band_mapping(bands, path)
        indexes = resolve_bands(src, mapping, list(meta.bands))
        if len(set(indexes)) != len(indexes):
            raise bad_file(path, f"band mapping uses one band for several model inputs ({meta.bands})")
        grid = target_grid(src, meta.gsd)
        coarser = meta.gsd is not None and meta.gsd > ground_resolution(src)
        view = aligned(src, grid, Resampling.average if coarser else Resampling.bilinear)
        try:
            yield SceneView(path, view, grid, indexes, dtype, meta.scale)
        finally:
            if view is not src:
                view.close()


def output_grid(meta: ModelMeta, grid: Grid) -> Grid:
    """The map's grid: the pixel grid (segmentation) or cells of tile_size // 2 px (classification)."""
    if meta.segmentation:
        return grid
    cell, rows, cols = cell_grid_shape(grid.height, grid.width, meta.tile_size)
    return Grid(grid.crs, grid.transform * Affine.scale(cell), cols, rows)
