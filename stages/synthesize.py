"""Write the built-in default data set: a varied catalog of synthetic multi-sensor scenes.

Each scene is a tiled, compressed GeoTIFF written window by window (memory does not grow with
scene size) whose land cover follows smooth random fields in ground coordinates; its labels
are a label raster on a different grid (sometimes a different CRS) or GeoJSON polygons.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
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

from stages.params import DataParams, SynthesizeParams
from stages.synth_fields import (
    BANDS,
    LIBRARY,
    Look,
    clouds,
    footprint,
    grid_classes,
    make_clouds,
    make_look,
    point_classes,
    reflectance,
)

GSDS = (0.5, 1.0, 2.0, 3.0, 5.0, 10.0)
# UTM zone EPSG, easting range, northing range of plausible scene origins.
SITES = (
    (32610, (450e3, 650e3), (4.05e6, 4.35e6)),  # California
    (32633, (400e3, 600e3), (5.20e6, 5.60e6)),  # central Europe
    (32636, (300e3, 700e3), (3.30e6, 3.45e6)),  # Nile delta
    (32718, (200e3, 800e3), (8.40e6, 8.80e6)),  # Peru
    (32755, (300e3, 700e3), (5.70e6, 5.90e6)),  # Victoria, Australia
    (32643, (300e3, 700e3), (2.00e6, 3.00e6)),  # India
    (32721, (300e3, 700e3), (7.20e6, 7.50e6)),  # Paraguay
    (32650, (300e3, 700e3), (4.30e6, 4.50e6)),  # northern China
    (32735, (300e3, 700e3), (7.00e6, 7.30e6)),  # South Africa
)
GEO_SITE = ((5.0, 25.0), (43.0, 53.0))  # lon, lat of the one EPSG:4326 scene
DEG = 111_320.0  # metres per degree, roughly
COARSE = 4  # GeoJSON labels are polygons of a 4x coarser class grid


@dataclass(frozen=True)
class Plan:
    """One scene: grid, sensor, appearance, nodata and label layout."""

    index: int
    sid: str
    width: int
    height: int
    gsd: float
    crs: CRS
    transform: Affine
    dtype: str
    described: bool
    sensor: str
    look: Look
    labels: str  # "raster" or "geojson"
    label_crs: CRS
    label_prop: str  # GeoJSON "class" property: "name" or "value"
    collar: tuple[float, float] | None  # footprint rotation (rad) and scale
    cloud: tuple[float, int, float] | None  # cloud cell (m), seed, threshold
    stretch: tuple[float, float]  # uint8 scale and gamma

    @property
    def block(self) -> int:
        """GeoTIFF block size: 512, or 256 for small scenes."""
        return 512 if min(self.width, self.height) >= 1024 else 256


def _west_zone(crs: CRS) -> CRS:
    code = crs.to_epsg() or 32633
    return CRS.from_epsg(code - 1 if code % 100 > 1 else code + 59)


def plan_scenes(params: SynthesizeParams, n_classes: int) -> list[Plan]:
    """Draw the layout of every scene from the seed (small: no pixel data)."""
    rng = np.random.default_rng([params.seed, 0])
    reps = params.scenes // 4 + 1
    pools = {  # 8-bit RGB products are high-resolution; multispectral ones span every GSD
        "uint8": [float(g) for _ in range(reps) for g in rng.permutation(GSDS[:4])],
        "uint16": [float(g) for _ in range(reps) for g in rng.permutation(GSDS)],
    }
    sites = [SITES[j] for j in rng.permutation(len(SITES))]
    no_desc = min(3, params.scenes - 1)
    # Land covers each place lacks, dealt from shuffled decks so every class is missing from
    # about as many scenes as the others (one per scene; none with three classes or fewer).
    deck = [int(c) for _ in range(2 * reps + 2) for c in rng.permutation(n_classes)]
    plans = []
    for i in range(params.scenes):
        r = np.random.default_rng([params.seed, 1, i])
        w, h = (int(r.integers(params.min_size, params.max_size + 1)) for _ in range(2))
        dtype = "uint8" if i % 3 == 1 else "uint16"
        gsd = pools[dtype].pop(0)
        if i == 2:
            crs = CRS.from_epsg(4326)
            res = gsd / DEG
            lon, lat = r.uniform(*GEO_SITE[0]), r.uniform(*GEO_SITE[1])
            tf = Affine(res, 0, round(lon, 4), 0, -res, round(lat, 4))
        else:
            code, (e0, e1), (n0, n1) = sites[i % len(sites)]
            crs = CRS.from_epsg(code)
            if i == 0:  # near the zone's western edge: its labels use the western neighbour zone
                e0, e1 = 180e3, 240e3
            x0, y0 = round(r.uniform(e0, e1) / 10) * 10, round(r.uniform(n0, n1) / 10) * 10
            tf = Affine(gsd, 0, float(x0), 0, -gsd, float(y0))
        sensor = (
            "aerial-rgb"
            if dtype == "uint8"
            else ("vhr-ms", "hr-ms", "mr-ms")[0 if gsd <= 1 else 1 if gsd <= 3 else 2]
        )
        sigma = {"aerial-rgb": 0.011, "vhr-ms": 0.012, "hr-ms": 0.009, "mr-ms": 0.007}[sensor]
        labels = "raster" if i % 2 == 0 else "geojson"
        label_crs = _west_zone(crs) if i == 0 else CRS.from_epsg(3857) if i == 2 else crs
        if labels == "geojson" and i != 1:
            label_crs = CRS.from_epsg(4326)  # RFC 7946 lon/lat; scene 1 keeps its UTM CRS
        absent = (deck.pop(0),) if n_classes >= 4 else ()
        collar = (r.uniform(0.16, 0.3), r.uniform(0.96, 1.0)) if i % 3 != 1 else None
        cloud = make_clouds(r, w * gsd, h * gsd) if i % 3 != 0 else None
        plans.append(
            Plan(
                index=i,
                sid=f"s{i:02d}",
                width=w,
                height=h,
                gsd=gsd,
                crs=crs,
                transform=tf,
                dtype=dtype,
                described=i != no_desc,
                sensor=sensor,
                look=make_look(r, n_classes, gsd, sigma, absent),
                labels=labels,
                label_crs=label_crs,
                label_prop="value" if i % 4 == 1 else "name",
                collar=collar,
                cloud=cloud,
                stretch=(r.uniform(2.4, 2.6), r.uniform(0.77, 0.83)),
            )
        )
    return plans


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
        dst.update_tags(SENSOR=plan.sensor, GSD_M=f"{plan.gsd:g}", SYNTHETIC="tilepipe")
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


def synthesize(params: SynthesizeParams, data: DataParams, out_dir: Path) -> dict:
    """Write the synthetic scene collection and ``catalog.csv`` to ``out_dir`` (atomically)."""
    if len(data.classes) > len(LIBRARY):
        raise ValueError(f"synthesize: at most {len(LIBRARY)} classes, got {len(data.classes)}")
    if any(c.value == 0 for c in data.classes):
        raise ValueError("synthesize: class value 0 is reserved for unlabelled pixels")
    names = data.class_names
    values = np.array([c.value for c in data.classes], np.uint8)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    scenes = []
    try:
        rows = []
        for plan in plan_scenes(params, len(names)):
            image = f"{plan.sid}.tif"
            nodata = write_image(plan, tmp / image, params.seed)
            if plan.labels == "raster":
                labels = f"{plan.sid}_labels.tif"
                write_label_raster(plan, tmp / labels, values)
            else:
                labels = f"{plan.sid}_labels.geojson"
                write_label_geojson(plan, tmp / labels, values, names)
            bands = "" if plan.described else ";".join(f"{b}={i}" for i, b in enumerate(BANDS, 1))
            rows.append({"scene_id": plan.sid, "image": image, "labels": labels, "bands": bands})
            crs = plan.crs.to_string()
            scenes.append({"scene_id": plan.sid, "width": plan.width, "height": plan.height,
                           "crs": crs, "gsd": plan.gsd, "dtype": plan.dtype, "sensor": plan.sensor,
                           "labels": labels, "label_crs": plan.label_crs.to_string(),
                           "nodata": round(nodata, 4)})  # fmt: skip
            print(f"synthesize: {plan.sid} {plan.width}x{plan.height} {crs} gsd {plan.gsd:g} m "
                  f"{plan.dtype} {plan.sensor} nodata {nodata:.0%} labels {labels}", flush=True)  # fmt: skip
        with open(tmp / "catalog.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["scene_id", "image", "labels", "bands"])
            writer.writeheader()
            writer.writerows(rows)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out_dir.with_name(f"{tmp.name}.old")
    if out_dir.exists():
        out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except OSError:
        if old.exists():
            old.rename(out_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return {"catalog": str(out_dir / "catalog.csv"), "scenes": scenes,
            "classes": names, "pixels": sum(s["width"] * s["height"] for s in scenes)}  # fmt: skip
