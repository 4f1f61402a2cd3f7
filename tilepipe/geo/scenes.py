"""Inspecting one catalog scene: validate image and labels, and record what tiling needs to know."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from rasterio.enums import MaskFlags
from rasterio.errors import RasterioError

from tilepipe.errors import TilepipeError, bad_file
from tilepipe.fsutil import file_sha256, input_problem, relative_to_cwd
from tilepipe.geo.aoi import WGS84, SceneAoi, geometry_sha256, read_aoi, scene_aoi
from tilepipe.geo.bands import band_names, parse_band_mapping, resolve_bands
from tilepipe.geo.catalog import CatalogRow, naming_origin
from tilepipe.geo.labels import is_geojson, label_bounds_in
from tilepipe.geo.raster_io import check_georeferenced, ground_resolution, open_raster
from tilepipe.geo.remote import is_remote, remote_stat
from tilepipe.params import Params
from tilepipe.redaction import redact

MAX_PIXELS = 10**12  # beyond this a header is taken to lie about the size
SAMPLE_BLOCKS = 256  # nodata is estimated on this many blocks at most
ZERO_SAMPLE_BLOCKS = 16  # an image is checked for being all zeros on this many blocks first


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
    datetime: str | None = None  # acquisition time, when the catalog (STAC) gives it
    origin: str | None = None  # the STAC item that names the scene
    # area of interest (geo/aoi.py): its file or item, SHA-256, GeoJSON in the scene's CRS, size
    aoi: str | None = None
    aoi_sha256: str | None = None
    aoi_geometry: dict[str, Any] | None = None
    aoi_area_km2: float | None = None
    aoi_fraction: float | None = None

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
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})


def read_scene_records(scenes_json: Path | str) -> list[SceneRecord]:
    """The scenes of an ingest record (``data/ingest/scenes.json``)."""
    return [SceneRecord.from_dict(s) for s in json.loads(Path(scenes_json).read_text())["scenes"]]


def _spread(count: int, sample: int | None) -> np.ndarray:
    """Up to ``sample`` indices spread evenly over ``range(count)`` (all of them for None)."""
    return np.unique(np.linspace(0, count - 1, num=min(count, sample or count)).round().astype(int))


def _nodata_fraction(src, sample: int | None = None) -> tuple[float, float]:
    """Nodata share, and the share that is NaN or infinite, on up to ``sample`` blocks spread evenly.

    Full-resolution block reads: a decimated read (``out_shape``) of a file without overviews
    makes GDAL fetch the same blocks over and over and takes a minute per scene.
    """
    windows = [w for _, w in src.block_windows(1)]
    picks = _spread(len(windows), sample)
    floating = np.issubdtype(np.dtype(src.dtypes[0]), np.floating)
    invalid = not_finite = total = 0
    for i in picks:
        valid = src.dataset_mask(window=windows[i]) > 0
        if floating:
            finite = np.all(np.isfinite(src.read(window=windows[i])), axis=0)
            not_finite += int(finite.size - finite.sum())
            valid &= finite
        invalid += int(valid.size - valid.sum())
        total += valid.size
    fraction = invalid / max(total, 1)
    if fraction >= 1.0 and len(picks) < len(windows):
        return _nodata_fraction(src)  # before calling a scene empty, look at every block
    return fraction, not_finite / max(total, 1)


def _all_zero(src, sample: int | None = ZERO_SAMPLE_BLOCKS) -> bool:
    """True when every pixel of every band is 0 (a few blocks first; all of them before saying so)."""
    windows = [w for _, w in src.block_windows(1)]
    picks = _spread(len(windows), sample)
    if any(np.any(src.read(window=windows[i])) for i in picks):
        return False
    return len(picks) == len(windows) or _all_zero(src, None)


def _pixel_warnings(src, path: Path, not_finite: float) -> list[str]:
    """Usable but suspicious pixels: NaN (kept as nodata), or an image of zeros with no nodata."""
    warnings, name = [], redact(path)
    if not_finite > 0:
        warnings.append(
            f"{name}: {not_finite:.1%} of the sampled pixels are NaN or infinite: they are treated as nodata"
        )
    if src.nodata is None and all(f == [MaskFlags.all_valid] for f in src.mask_flag_enums) and _all_zero(src):
        warnings.append(f"{name}: every pixel is 0 and the file sets no nodata: it carries no signal (kept)")
    return warnings


def _check_label_classes(row: CatalogRow, params: Params) -> None:
    """Every class a STAC item's ``label:classes`` lists must be one of ``data.classes``."""
    names = {c.name for c in params.data.classes}
    values = {c.value for c in params.data.classes}
    for label in row.label_classes or ():
        text = str(label)
        if not (label in names or (text.isdigit() and int(text) in values)):
            raise TilepipeError(
                f"label:classes lists class {label!r}, which data.classes does not define "
                f"({', '.join(f'{c.name}={c.value}' for c in params.data.classes)})"
            )


def inspect_scene(row: CatalogRow, params: Params, warn: Callable[[str], None] = print) -> SceneRecord:
    """Validate one scene and its labels; return its metadata record or raise a one-line error.

    What is usable but suspicious goes to ``warn``, one line each, naming the file. A problem with
    a STAC item's files names the item's JSON file too.
    """
    with naming_origin(row):
        _check_label_classes(row, params)
        return _inspect(row, params, warn)


def _fingerprint(location: Path | str) -> str:
    """SHA-256 of a local file; ETag, size and last-modified of a remote one (geo.remote)."""
    return remote_stat(location).fingerprint if is_remote(location) else file_sha256(location)


def _recorded(location: Path | str) -> str:
    """How scenes.json names a file: a URI as it is, a local path relative to the working directory."""
    return location if is_remote(location) else relative_to_cwd(location)


def _aoi(row: CatalogRow, src, gsd_m: float) -> dict[str, Any]:
    """The ``aoi*`` fields of a scene's record: its catalog AOI on the scene; {} without one."""
    if row.aoi is None:
        return {}
    if isinstance(row.aoi, dict):  # a STAC item's geometry: lon/lat (RFC 7946)
        source, sha = f"{row.origin} geometry", geometry_sha256(row.aoi)
        geom, crs = shapely.geometry.shape(row.aoi), WGS84
    else:
        source, (geom, crs) = _recorded(row.aoi), read_aoi(row.aoi)
        sha = _fingerprint(row.aoi)
    found: SceneAoi = scene_aoi(source, geom, crs, sha, src, row.image, gsd_m)
    return {
        "aoi": found.source,
        "aoi_sha256": found.sha256,
        "aoi_geometry": found.geometry,
        "aoi_area_km2": found.area_km2,
        "aoi_fraction": found.fraction,
    }


def _inspect(row: CatalogRow, params: Params, warn: Callable[[str], None]) -> SceneRecord:
    if is_remote(row.labels):
        remote_stat(row.labels)
    elif problem := input_problem(row.labels, missing="label file not found"):
        raise bad_file(row.labels, problem)
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
        indexes = resolve_bands(src, mapping, params.bands.input, row.band_labels, row.sensor)
        try:
            nodata_fraction, not_finite = _nodata_fraction(src, SAMPLE_BLOCKS)
            if nodata_fraction >= 1.0:
                raise bad_file(row.image, "every pixel is nodata (or NaN): nothing to learn from")
            for warning in _pixel_warnings(src, row.image, not_finite):
                warn(warning)
        except RasterioError as exc:
            raise bad_file(row.image, f"cannot read pixels ({str(exc).splitlines()[0]})") from None
        left, bottom, right, top = label_bounds_in(row.labels, params.data, src.crs)
        img = src.bounds
        if left >= img.right or right <= img.left or bottom >= img.top or top <= img.bottom:
            raise bad_file(row.labels, f"labels do not overlap their image {Path(str(row.image)).name}")
        gsd_m = ground_resolution(src)
        return SceneRecord(
            scene_id=row.scene_id,
            image=_recorded(row.image),
            labels=_recorded(row.labels),
            labels_kind="geojson" if is_geojson(row.labels) else "raster",
            split=row.split,
            bands=band_names(src, mapping, row.band_labels, row.sensor),
            input_bands=dict(zip(params.bands.input, indexes, strict=True)),
            width=src.width,
            height=src.height,
            count=src.count,
            crs=src.crs.to_string(),
            transform=list(src.transform)[:6],
            bounds=list(src.bounds),
            res=list(src.res),
            gsd_m=round(gsd_m, 4),
            dtype=dtype,
            nodata=None if src.nodata is None or np.isnan(src.nodata) else src.nodata,
            nodata_fraction=round(nodata_fraction, 4),
            image_sha256=_fingerprint(row.image),  # a remote file: etag:...;size:...;modified:...
            labels_sha256=_fingerprint(row.labels),
            datetime=row.datetime,
            origin=row.origin,
            **_aoi(row, src, gsd_m),
        )
