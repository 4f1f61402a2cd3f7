"""Writing one built-in scene: a tiled GeoTIFF window by window, and its label raster or GeoJSON.

Land cover follows smooth random fields in ground coordinates (tilepipe/synth/fields.py), so
memory does not grow with scene size; labels lie on another grid (sometimes another CRS).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.features import shapes
from rasterio.transform import Affine, array_bounds
from rasterio.warp import calculate_default_transform, transform, transform_bounds, transform_geom
from rasterio.windows import Window
from shapely.geometry import mapping, shape
from shapely.geometry.polygon import orient

from tilepipe.synth.fields import BANDS, clouds, footprint, grid_classes, point_classes, reflectance
from tilepipe.synth.plan import COARSE, Plan

ACQUISITION_START = datetime(2023, 1, 1)  # the built-in scenes' acquisition times (TIFFTAG_DATETIME)

def _valid(plan: Plan, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Valid-data mask of a window: inside the rotated swath footprint and not under cloud."""
    ok = np.ones((rows.size, cols.size), bool)
    if plan.collar:
        ok &= footprint(plan.collar, plan.width, plan.height, rows, cols)
    if plan.cloud:
        ok &= ~clouds(plan.cloud, (cols + 0.5) * plan.gsd, (rows + 0.5) * plan.gsd)
    return ok


def _windows(width: int, height: int, block: int) -> Iterator[Window]:
    for r0 in range(0, height, block):
        for c0 in range(0, width, 4 * block):
            yield Window(c0, r0, min(4 * block, width - c0), min(block, height - r0))


def _profile(crs: CRS, tf: Affine, w: int, h: int, count: int, dtype: str, block: int) -> dict:
    return {
        "driver": "GTiff", "width": w, "height": h, "count": count, "dtype": dtype, "crs": crs,
        "transform": tf, "nodata": 0, "tiled": True, "blockxsize": block, "blockysize": block,
        "compress": "deflate", "predictor": 2,
    }  # fmt: skip


def _window_classes(plan: Plan, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Class index per pixel; GeoJSON scenes use the coarse grid the polygons are made from."""
    g = plan.gsd
    if plan.labels == "raster":
        return grid_classes(plan.look, (cols + 0.5) * g, (rows + 0.5) * g)
    cc = np.arange(cols[0] // COARSE, cols[-1] // COARSE + 1)
    rc = np.arange(rows[0] // COARSE, rows[-1] // COARSE + 1)
    coarse = grid_classes(plan.look, (cc + 0.5) * COARSE * g, (rc + 0.5) * COARSE * g)
    full = np.repeat(np.repeat(coarse, COARSE, 0), COARSE, 1)
    return full[rows - rc[0] * COARSE][:, cols - cc[0] * COARSE]


def write_image(plan: Plan, path: Path, seed: int) -> float:
    """Write one scene's GeoTIFF window by window; return its nodata fraction."""
    rgb = plan.dtype == "uint8"
    order = [2, 1, 0] if rgb else [0, 1, 2, 3]
    prof = _profile(plan.crs, plan.transform, plan.width, plan.height, len(order), plan.dtype, plan.block)
    if rgb:
        prof["photometric"] = "RGB"
    nodata = 0
    with rasterio.open(path, "w", **prof) as dst:
        acquired = ACQUISITION_START + timedelta(days=seed % 730, hours=10)  # drawn from the seed
        dst.update_tags(SENSOR=plan.sensor, GSD_M=f"{plan.gsd:g}", SYNTHETIC="tilepipe",
                        TIFFTAG_DATETIME=acquired.strftime("%Y:%m:%d %H:%M:%S"))  # fmt: skip
        if plan.described:
            for b, idx in enumerate(order, start=1):
                dst.set_band_description(b, BANDS[idx])
        for win in _windows(plan.width, plan.height, plan.block):
            rows = np.arange(win.row_off, win.row_off + win.height)
            cols = np.arange(win.col_off, win.col_off + win.width)
            cls = _window_classes(plan, rows, cols)
            rng = np.random.default_rng([seed, plan.index, win.row_off, win.col_off])
            refl = reflectance(plan.look, cls, (cols + 0.5) * plan.gsd, (rows + 0.5) * plan.gsd, rng)
            refl = refl[order]
            if rgb:
                k, gamma = plan.stretch
                dn = 255 * np.clip(refl * k, 0, 1) ** gamma
                dn = np.clip(np.rint(dn), 1, 255).astype(np.uint8)
            else:
                dn = np.clip(np.rint(refl * 10000), 1, 65535).astype(np.uint16)
            valid = _valid(plan, rows, cols)
            dn[:, ~valid] = 0
            nodata += int((~valid).sum())
            dst.write(dn, window=win)
    return nodata / (plan.width * plan.height)


def _label_grid(plan: Plan, r: np.random.Generator) -> tuple[Affine, int, int]:
    """A 2x coarser grid in the label CRS, origin offset by a fraction of a label pixel."""
    left, bottom, right, top = array_bounds(plan.height, plan.width, plan.transform)
    if plan.label_crs != plan.crs:
        default, _, _ = calculate_default_transform(
            plan.crs, plan.label_crs, plan.width, plan.height, left, bottom, right, top
        )
        res = 2 * abs(default.a)
        left, bottom, right, top = transform_bounds(plan.crs, plan.label_crs, left, bottom, right, top)
    else:
        res = 2 * plan.transform.a
    left -= r.uniform(0.1, 0.9) * res
    top += r.uniform(0.1, 0.9) * res
    return (
        Affine(res, 0, left, 0, -res, top),
        math.ceil((right - left) / res),
        math.ceil((top - bottom) / res),
    )


def _lerp(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    i = np.clip(np.searchsorted(src, dst, side="right") - 1, 0, src.size - 2)
    return i, ((dst - src[i]) / (src[i + 1] - src[i]))[..., None]


def _label_points(plan: Plan, tf: Affine, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, ...]:
    """Label pixel centres (rows x cols, 2-d) in the image CRS.

    Across CRSs the points are projected on an 8-pixel lattice and interpolated bilinearly
    (sub-millimetre error for these smooth projections, and far fewer PROJ calls).
    """
    xs, ys = np.meshgrid(tf.c + cols * tf.a, tf.f + rows * tf.e)
    if plan.label_crs == plan.crs:
        return xs, ys
    rs, cs = np.arange(rows[0], rows[-1] + 9, 8), np.arange(cols[0], cols[-1] + 9, 8)
    lx, ly = np.meshgrid(tf.c + cs * tf.a, tf.f + rs * tf.e)
    px, py = transform(plan.label_crs, plan.crs, lx.ravel(), ly.ravel())
    pts = np.stack([np.reshape(px, lx.shape), np.reshape(py, lx.shape)], -1)
    ir, wr = _lerp(rs, rows)
    ic, wc = _lerp(cs, cols)
    pts = pts[ir] * (1 - wr[..., None]) + pts[ir + 1] * wr[..., None]
    pts = pts[:, ic] * (1 - wc) + pts[:, ic + 1] * wc
    return pts[..., 0], pts[..., 1]


def write_label_raster(plan: Plan, path: Path, values: np.ndarray) -> None:
    """Write a uint8 label raster on its own grid, each pixel the class at its centre."""
    tf, w, h = _label_grid(plan, np.random.default_rng([plan.look.seed, 2]))
    block = 512 if min(w, h) >= 1024 else 256
    inv = ~plan.transform
    with rasterio.open(path, "w", **_profile(plan.label_crs, tf, w, h, 1, "uint8", block)) as dst:
        for win in _windows(w, h, block):
            cols = np.arange(win.col_off, win.col_off + win.width) + 0.5
            rows = np.arange(win.row_off, win.row_off + win.height) + 0.5
            x, y = _label_points(plan, tf, rows, cols)
            c = inv.a * x + inv.b * y + inv.c
            rr = inv.d * x + inv.e * y + inv.f
            inside = (c >= 0) & (c < plan.width) & (rr >= 0) & (rr < plan.height)
            out = np.zeros(x.shape, np.uint8)
            if inside.any():
                k = point_classes(plan.look, c[inside] * plan.gsd, rr[inside] * plan.gsd)
                out[inside] = values[k]
            dst.write(out[None], window=win)


def _rounded(coords: Any, nd: int) -> Any:
    if isinstance(coords[0], int | float):
        return [round(float(v), nd) for v in coords]
    return [_rounded(c, nd) for c in coords]


def write_label_geojson(plan: Plan, path: Path, values: np.ndarray, names: list[str]) -> None:
    """Polygonize the coarse class grid chunk by chunk and stream the features to GeoJSON."""
    cw, ch = math.ceil(plan.width / COARSE), math.ceil(plan.height / COARSE)
    ctf = plan.transform * Affine.scale(COARSE)
    to_ll = plan.label_crs != plan.crs
    nd = 7 if plan.label_crs.is_geographic else 2
    with open(path, "w") as f:
        f.write('{"type": "FeatureCollection",')
        if plan.label_crs != CRS.from_epsg(4326):
            crs_name = f"EPSG:{plan.label_crs.to_epsg()}"
            f.write(f' "crs": {{"type": "name", "properties": {{"name": "{crs_name}"}}}},')
        f.write(' "features": [')
        first = True
        for win in _windows(cw, ch, 256):  # chunks of 256 x 1024 coarse cells
            cc = np.arange(win.col_off, win.col_off + win.width)
            rc = np.arange(win.row_off, win.row_off + win.height)
            k = grid_classes(plan.look, (cc + 0.5) * COARSE * plan.gsd, (rc + 0.5) * COARSE * plan.gsd)
            wtf = ctf * Affine.translation(win.col_off, win.row_off)
            for geom, idx in shapes(k, transform=wtf):
                if to_ll:
                    geom = transform_geom(plan.crs, plan.label_crs, geom)
                geom = mapping(orient(shape(geom), 1.0))
                prop = names[int(idx)] if plan.label_prop == "name" else int(values[int(idx)])
                coords = _rounded(geom["coordinates"], nd)
                feat = {"type": "Feature", "properties": {"class": prop},
                        "geometry": {"type": geom["type"], "coordinates": coords}}  # fmt: skip
                f.write(("" if first else ",") + "\n" + json.dumps(feat, separators=(",", ":")))
                first = False
        f.write("\n]}\n")
