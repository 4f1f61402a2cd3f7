"""A scene opened for prediction on the model's grid and bands, and the grid of the map it gives."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.enums import Resampling
from rasterio.transform import Affine
from rasterio.windows import Window

from tilepipe.errors import bad_file
from tilepipe.geo.band_stats import BandAccumulator
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
from tilepipe.ml.normalize import Normalization, normalize, scene_scale

STATS_READ_PX = 1 << 20  # pixels per read of the statistics pass (``scene`` normalisation)

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
    norm: Normalization = field(default_factory=Normalization)  # the model's (``ModelMeta.norm``)
    scene_stats: np.ndarray | None = None  # ``scene``: this scene's (mean, std), from a first pass

    def unit(self, window) -> tuple[np.ndarray, np.ndarray]:
        """A window (may pass the edge) as float32 bands in [0, 1], zero where invalid, and its mask."""
        raw, valid = read_padded(self.view, window, self.indexes)
        image = scale_to_unit(raw, self.dtype, self.scale)
        np.copyto(image, np.float32(0), where=~valid)  # 5x faster than boolean-index assignment
        return image, valid

    def read(self, window) -> tuple[np.ndarray, np.ndarray]:
        """A window as the model takes it (``tilepipe.ml.normalize``), and its validity mask."""
        image, valid = self.unit(window)
        if self.norm.per_scene and self.scene_stats is None:
            self.scene_stats = scene_scale(self.statistics())
        return normalize(image, self.norm, self.scene_stats), valid

    def statistics(self) -> dict[str, Any]:
        """Band statistics of the whole scene on the model's grid, valid pixels only: a streaming pass."""
        acc = BandAccumulator(len(self.indexes))
        rows = max(1, STATS_READ_PX // max(self.grid.width, 1))
        for row in range(0, self.grid.height, rows):
            image, valid = self.unit(Window(0, row, self.grid.width, min(rows, self.grid.height - row)))
            acc.add(image[:, valid])
        if acc.count == 0:
            raise bad_file(self.path, "holds no valid pixel to normalise by (bands.normalize: scene)")
        return acc.result()


def check_gsd(path: Path | str, gsd: float, meta: ModelMeta, tolerance: float | None) -> None:
    """Refuse a scene whose GSD is outside the model's trained range by more than ``tolerance``.

    ``tolerance`` is a share of the range's ends; a model trained at one ``tile.gsd`` resamples instead.
    """
    if tolerance is None or meta.gsd is not None or not meta.gsd_range:
        return
    low, high = meta.gsd_range
    if gsd < low * (1 - tolerance) or gsd > high * (1 + tolerance):
        raise bad_file(
            path,
            f"ground resolution {gsd:.3g} m is outside the {low:.3g}-{high:.3g} m the model was trained on "
            f"by more than predict.gsd_tolerance ({tolerance:g}): resample the scene, or use a model "
            "trained at a fixed tile.gsd",
        )


@contextmanager
def open_scene(
    path: Path | str,
    meta: ModelMeta,
    bands: str | dict[str, int] | None = None,
    gsd_tolerance: float | None = None,
):
    """Open a scene on the model's grid, normalised as the model was trained; a misfit is one line.

    Its bands must fit the model, and with ``gsd_tolerance`` its ground resolution too (``check_gsd``).
    """
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
        check_gsd(path, ground_resolution(src), meta, gsd_tolerance)
        grid = target_grid(src, meta.gsd)
        coarser = meta.gsd is not None and meta.gsd > ground_resolution(src)
        view = aligned(src, grid, Resampling.average if coarser else Resampling.bilinear)
        try:
            yield SceneView(path, view, grid, indexes, dtype, meta.scale, meta.norm)
        finally:
            if view is not src:
                view.close()


def output_grid(meta: ModelMeta, grid: Grid) -> Grid:
    """The map's grid: the pixel grid (segmentation) or cells of tile_size // 2 px (classification)."""
    if meta.segmentation:
        return grid
    cell, rows, cols = cell_grid_shape(grid.height, grid.width, meta.tile_size)
    return Grid(grid.crs, grid.transform * Affine.scale(cell), cols, rows)
