"""Raster I/O shared by the library: GDAL settings, opening, scaling, aligned grids (bands: geo.bands)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TypeVar

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import RasterioError
from rasterio.transform import Affine
from rasterio.vrt import WarpedVRT
from rasterio.warp import calculate_default_transform, transform_bounds
from rasterio.windows import Window

from tilepipe.errors import bad_file
from tilepipe.fsutil import input_problem
from tilepipe.geo.remote import (
    StoreUnavailable,
    check_remote,
    gdal_cloud_options,
    is_remote,
    network_fault,
    remote_stat,
)
from tilepipe.redaction import redact, redact_text

T = TypeVar("T")

MIB = 1024 * 1024
METRES_PER_DEGREE = 111_320.0
_ALL_VALID = [MaskFlags.all_valid]
_SIMPLE_MASKS = ([MaskFlags.nodata], _ALL_VALID)


@contextmanager
def gdal_env(cache_mb: int = 64) -> Iterator[None]:
    """GDAL settings for one process: a block cache of ``cache_mb`` MiB (the default takes 5% of RAM).

    With them, the settings for reading scenes from object storage or HTTP (remote.gdal_cloud_options).
    rasterio hands an integer GDAL_CACHEMAX to ``GDALSetCacheMax64``, which counts bytes (not MB as
    the environment variable does): a bare 64 would leave a cache of 64 bytes, i.e. none, and every
    read across block boundaries would decode its blocks again.
    """
    with rasterio.Env(GDAL_CACHEMAX=cache_mb * MIB, **gdal_cloud_options()):
        yield


def open_raster(path: Path | str) -> rasterio.io.DatasetReader:
    """Open a raster (a local file, or an s3:// / https:// URI) or fail with one line naming it."""
    if is_remote(path):
        return _open_remote(str(path))
    path = Path(path)
    if problem := input_problem(path):
        raise bad_file(path, problem)
    if path.stat().st_size == 0:
        raise bad_file(path, "file is empty")
    try:
        return rasterio.open(path)
    except RasterioError as exc:
        reason = str(exc).split("\n")[0]
        raise bad_file(path, f"not a readable raster ({reason})") from None


def _open_remote(uri: str) -> rasterio.io.DatasetReader:
    """Open a remote raster through GDAL's /vsis3/ or /vsicurl/; a failure says why, naming the URI."""
    check_remote(uri)
    try:
        return rasterio.open(uri)
    except RasterioError as exc:
        remote_stat(uri)  # a missing object, a denied bucket or a silent endpoint: said as such
        reason = redact_text(str(exc).split("\n")[0].replace(uri, redact(uri)))
        if network_fault(exc):  # throttled or failed on the way, though the store answers now
            raise StoreUnavailable(f"{redact(uri)}: the store failed to serve it ({reason})") from None
        raise bad_file(redact(uri), f"not a readable raster ({reason})") from None


def scale_to_unit(data: np.ndarray, dtype: str, scale: dict[str, tuple[float, float]]) -> np.ndarray:
    """Map a dtype's range linearly onto [0, 1] (clipped), as float32."""
    low, high = scale[dtype]
    out = np.empty(data.shape, dtype=np.float32)  # in place from here: one array, three passes
    np.subtract(data, np.float32(low), out=out, dtype=np.float32)  # data cast to float32 first
    np.multiply(out, np.float32(1.0 / (high - low)), out=out)
    np.clip(out, 0.0, 1.0, out=out)
    if np.issubdtype(data.dtype, np.floating):
        np.nan_to_num(out, copy=False, nan=0.0)
    return out


@dataclass(frozen=True)
class Grid:
    """A pixel grid: CRS, affine transform and size. Tiles are cut on it."""

    crs: CRS
    transform: Affine
    width: int
    height: int

    def window_transform(self, window: Window) -> Affine:
        """Affine transform of a window of this grid (windows may extend past the edge)."""
        return rasterio.windows.transform(window, self.transform)

    def window_bounds(self, window: Window) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) of a window in the grid's CRS."""
        return rasterio.windows.bounds(window, self.transform)


def ground_resolution(src: rasterio.io.DatasetReader) -> float:
    """Approximate ground sample distance in metres (degrees converted at the scene's latitude)."""
    res = (abs(src.transform.a) + abs(src.transform.e)) / 2
    if src.crs is not None and src.crs.is_geographic:
        lat = (src.bounds.top + src.bounds.bottom) / 2
        return res * METRES_PER_DEGREE * math.sqrt(max(math.cos(math.radians(lat)), 1e-6))
    return res * (src.crs.linear_units_factor[1] if src.crs is not None else 1.0)


def utm_crs_for(src: rasterio.io.DatasetReader) -> CRS:
    """The UTM zone CRS containing a scene's centre."""
    left, bottom, right, top = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
    lon, lat = (left + right) / 2, (bottom + top) / 2
    zone = int((lon + 180) // 6) % 60 + 1
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)


def target_grid(src: rasterio.io.DatasetReader, gsd: float | None) -> Grid:
    """The grid tiles are cut on: the scene's own, or resampled to ``gsd`` metres.

    Geographic scenes are warped to their UTM zone when a ground resolution is asked for,
    since a metre-sized pixel has no fixed size in degrees.
    """
    if gsd is None:
        return Grid(src.crs, src.transform, src.width, src.height)
    dst_crs = utm_crs_for(src) if src.crs.is_geographic else src.crs
    res = gsd / (dst_crs.linear_units_factor[1] if not dst_crs.is_geographic else 1.0)
    transform, width, height = calculate_default_transform(
        src.crs, dst_crs, src.width, src.height, *src.bounds, resolution=res
    )
    return Grid(dst_crs, transform, int(width), int(height))


def is_native(src: rasterio.io.DatasetReader, grid: Grid) -> bool:
    """True when ``grid`` is the dataset's own grid (no warping needed)."""
    return (
        src.crs == grid.crs
        and src.width == grid.width
        and src.height == grid.height
        and src.transform.almost_equals(grid.transform, precision=1e-9)
    )


def aligned(src: rasterio.io.DatasetReader, grid: Grid, resampling: Resampling):
    """A dataset whose pixels sit on ``grid``: ``src`` itself or a warped VRT of it."""
    if is_native(src, grid):
        return src
    options = {"add_alpha": True} if src.nodata is None else {"nodata": src.nodata}
    return WarpedVRT(
        src,
        crs=grid.crs,
        transform=grid.transform,
        width=grid.width,
        height=grid.height,
        resampling=resampling,
        **options,
    )


def read_ahead(read: Callable[..., T], calls: Iterable[tuple], cache_mb: int, depth: int = 2) -> Iterator[T]:
    """``read(*args)`` for each ``args`` of ``calls``, in order, run ahead by one background thread.

    GDAL decodes with the GIL released, so what the caller does with one result overlaps the reads
    of the next ``depth``. The thread has its own ``gdal_env`` (rasterio's settings are per thread);
    while the iterator is open only that thread may touch the datasets ``read`` uses, so close it
    (``contextlib.closing``) before closing them: that waits for the read in progress.
    """

    def in_env(*args) -> T:
        with gdal_env(cache_mb):
            return read(*args)

    todo = iter(calls)
    with ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as pool:
        pending = deque(pool.submit(in_env, *args) for args in islice(todo, depth))
        try:
            while pending:
                result = pending.popleft().result()
                pending.extend(pool.submit(in_env, *args) for args in islice(todo, 1))
                yield result
        finally:
            for future in pending:
                future.cancel()


def read_padded(src, window: Window, indexes: list[int], fill: float = 0) -> tuple[np.ndarray, np.ndarray]:
    """Read ``window`` (which may extend past the raster) as (data, valid mask).

    Pixels outside the raster, nodata pixels and non-finite values are marked invalid.
    """
    rows, cols = int(window.height), int(window.width)
    inner = window.intersection(Window(0, 0, src.width, src.height)) if _overlaps(src, window) else None
    if inner is None:
        empty = np.full((len(indexes), rows, cols), fill, dtype=src.dtypes[indexes[0] - 1])
        return empty, np.zeros((rows, cols), dtype=bool)
    r0, c0 = int(inner.row_off - window.row_off), int(inner.col_off - window.col_off)
    h, w = int(inner.height), int(inner.width)
    block = src.read(indexes, window=inner)
    ok = _valid_mask(src, indexes, block, inner)
    if np.issubdtype(block.dtype, np.floating):
        ok &= np.all(np.isfinite(block), axis=0)
    if (h, w) == (rows, cols):  # wholly inside the raster: no padding to add
        return block, ok
    data = np.full((len(indexes), rows, cols), fill, dtype=block.dtype)
    valid = np.zeros((rows, cols), dtype=bool)
    data[:, r0 : r0 + h, c0 : c0 + w] = block
    valid[r0 : r0 + h, c0 : c0 + w] = ok
    return data, valid


def _valid_mask(src, indexes: list[int], block: np.ndarray, window: Window) -> np.ndarray:
    """Pixels valid in every band: GDAL's masks, computed from ``block`` where GDAL would do the same.

    A band whose mask is its nodata value (integer dtype, in-range integral nodata) or "all valid"
    needs no second read: GDAL's nodata mask band reads the data again and compares, which costs
    more than the data read itself. Alpha bands and internal masks are read from GDAL.
    """
    flags = [src.mask_flag_enums[i - 1] for i in indexes]
    if np.issubdtype(block.dtype, np.integer) and all(f in _SIMPLE_MASKS for f in flags):
        limits = np.iinfo(block.dtype)
        checks = []
        for band, (i, flag) in enumerate(zip(indexes, flags, strict=True)):
            nodata = src.nodatavals[i - 1]
            if flag == _ALL_VALID:
                continue
            if nodata is None or not float(nodata).is_integer() or not limits.min <= nodata <= limits.max:
                return np.all(src.read_masks(indexes, window=window) > 0, axis=0)
            checks.append((band, block.dtype.type(nodata)))
        if len(checks) == len(indexes) and checks and {v for _, v in checks} == {limits.min}:
            return block.min(axis=0) > limits.min  # the usual nodata 0 of unsigned data: 5x the loop's speed
        ok = np.ones(block.shape[1:], dtype=bool)
        for band, nodata in checks:
            ok &= block[band] != nodata
        return ok
    return np.all(src.read_masks(indexes, window=window) > 0, axis=0)


def _overlaps(src, window: Window) -> bool:
    return (
        window.col_off < src.width
        and window.row_off < src.height
        and window.col_off + window.width > 0
        and window.row_off + window.height > 0
    )


def check_georeferenced(src: rasterio.io.DatasetReader) -> None:
    """Fail unless the raster has a CRS and a geotransform."""
    if src.crs is None:
        raise bad_file(src.name, "has no CRS (coordinate reference system)")
    if src.transform.is_identity or src.transform == Affine(1, 0, 0, 0, 1, 0):
        raise bad_file(src.name, "has no geotransform (pixel-to-map coordinates)")
