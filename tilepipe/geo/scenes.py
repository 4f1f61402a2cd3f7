"""Inspecting one catalog scene: validate image and labels, and record what tiling needs to know."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.errors import RasterioError

from tilepipe.errors import bad_file
from tilepipe.fsutil import file_sha256, relative_to_cwd
from tilepipe.geo.catalog import CatalogRow
from tilepipe.geo.labels import is_geojson, label_bounds_in
from tilepipe.geo.raster_io import (
    band_names,
    check_georeferenced,
    ground_resolution,
    open_raster,
    parse_band_mapping,
    resolve_bands,
)
from tilepipe.params import Params

MAX_PIXELS = 10**12  # beyond this a header is taken to lie about the size
SAMPLE_BLOCKS = 256  # nodata is estimated on this many blocks at most


@dataclass(frozen=True)
class SceneRecord:
    """One ingested scene, as ``scenes.json`` records it: files, grid, bands, dtype, nodata, hashes."""

    scene_id: str
    image: str  # path relative to where ingest ran
    labels: str
    labels_kind: str  # raster | geojson
    split: str | None  # pinned by the catalog, or None
    bands: dict[str, int]  # band name -> 1-based band index
    input_bands: dict[str, int]  # the model's input names -> band index
    width: int
    height: int
    count: int
    crs: str
    transform: list[float]
    bounds: list[float]
    res: list[float]
    gsd_m: float
    dtype: str
    nodata: float | None
    nodata_fraction: float
    image_sha256: str
    labels_sha256: str

    @property
    def band_mapping(self) -> dict[str, int]:
        """How to find the model's bands in the image: by name, else the input mapping."""
        return self.bands or self.input_bands

    def to_dict(self) -> dict[str, Any]:
        """The record as ``scenes.json`` stores it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SceneRecord:
        """A record read back from ``scenes.json`` (unknown keys are ignored)."""
        return cls(**{f.name: raw[f.name] for f in fields(cls)})


def read_scene_records(scenes_json: Path | str) -> list[SceneRecord]:
    """The scenes of an ingest record (``data/ingest/scenes.json``)."""
    return [SceneRecord.from_dict(s) for s in json.loads(Path(scenes_json).read_text())["scenes"]]


def _nodata_fraction(src, sample: int | None = None) -> float:
    """Nodata share estimated on up to SAMPLE_BLOCKS blocks spread evenly over the scene.

    Full-resolution block reads: a decimated read (``out_shape``) of a file without overviews
    makes GDAL fetch the same blocks over and over and takes a minute per scene.
    """
    windows = [w for _, w in src.block_windows(1)]
    picks = np.unique(
        np.linspace(0, len(windows) - 1, num=min(len(windows), sample or len(windows))).round().astype(int)
    )
    floating = np.issubdtype(np.dtype(src.dtypes[0]), np.floating)
    invalid = total = 0
    for i in picks:
        valid = src.dataset_mask(window=windows[i]) > 0
        if floating:
            valid &= np.all(np.isfinite(src.read(window=windows[i])), axis=0)
        invalid += int(valid.size - valid.sum())
        total += valid.size
    fraction = invalid / max(total, 1)
    if fraction >= 1.0 and len(picks) < len(windows):
        return _nodata_fraction(src)  # before calling a scene empty, look at every block
    return fraction


def inspect_scene(row: CatalogRow, params: Params) -> SceneRecord:
    """Validate one scene and its labels; return its metadata record or raise a one-line error."""
    if not row.labels.exists():
        raise bad_file(row.labels, "label file not found")
    with open_raster(row.image) as src:
        check_georeferenced(src)
        if src.width * src.height > MAX_PIXELS or src.width <= 0 or src.height <= 0:
            raise bad_file(row.image, f"header claims an absurd size {src.width} x {src.height}")
        dtype = src.dtypes[0]
        if dtype not in params.bands.scale:
            raise bad_file(
                row.image, f"dtype {dtype} is not supported (supported: {', '.join(params.bands.scale)})"
            )
        mapping = parse_band_mapping(row.bands, row.image)
        indexes = resolve_bands(src, mapping, params.bands.input)
        try:
            nodata_fraction = _nodata_fraction(src, SAMPLE_BLOCKS)
        except RasterioError as exc:
            raise bad_file(row.image, f"cannot read pixels ({str(exc).splitlines()[0]})") from None
        if nodata_fraction >= 1.0:
            raise bad_file(row.image, "every pixel is nodata (or NaN): nothing to learn from")
        left, bottom, right, top = label_bounds_in(row.labels, params.data, src.crs)
        img = src.bounds
        if left >= img.right or right <= img.left or bottom >= img.top or top <= img.bottom:
            raise bad_file(row.labels, f"labels do not overlap their image {row.image.name}")
        return SceneRecord(
            scene_id=row.scene_id,
            image=relative_to_cwd(row.image),
            labels=relative_to_cwd(row.labels),
            labels_kind="geojson" if is_geojson(row.labels) else "raster",
            split=row.split,
            bands=band_names(src, mapping),
            input_bands=dict(zip(params.bands.input, indexes, strict=True)),
            width=src.width,
            height=src.height,
            count=src.count,
            crs=src.crs.to_string(),
            transform=list(src.transform)[:6],
            bounds=list(src.bounds),
            res=list(src.res),
            gsd_m=round(ground_resolution(src), 4),
            dtype=dtype,
            nodata=None if src.nodata is None or np.isnan(src.nodata) else src.nodata,
            nodata_fraction=round(nodata_fraction, 4),
            image_sha256=file_sha256(row.image),
            labels_sha256=file_sha256(row.labels),
        )
