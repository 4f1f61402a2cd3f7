"""The layout of the built-in scenes, drawn from the seed: grids, CRSs, sensors, looks and labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rasterio.crs import CRS
from rasterio.transform import Affine

from tilepipe.params import SynthesizeParams
from tilepipe.synth.fields import Look, make_clouds, make_look

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


def _place(i: int, r: np.random.Generator, gsd: float, site: tuple) -> tuple[CRS, Affine]:
    """CRS and geotransform of scene ``i``: scene 2 in EPSG:4326, the others in their site's UTM zone."""
    if i == 2:
        res = gsd / DEG
        lon, lat = r.uniform(*GEO_SITE[0]), r.uniform(*GEO_SITE[1])
        return CRS.from_epsg(4326), Affine(res, 0, round(lon, 4), 0, -res, round(lat, 4))
    code, (e0, e1), (n0, n1) = site
    if i == 0:  # near the zone's western edge: its labels use the western neighbour zone
        e0, e1 = 180e3, 240e3
    x0, y0 = round(r.uniform(e0, e1) / 10) * 10, round(r.uniform(n0, n1) / 10) * 10
    return CRS.from_epsg(code), Affine(gsd, 0, float(x0), 0, -gsd, float(y0))


def _sensor(dtype: str, gsd: float) -> str:
    """The kind of product a scene imitates, from its dtype and ground resolution."""
    if dtype == "uint8":
        return "aerial-rgb"
    return ("vhr-ms", "hr-ms", "mr-ms")[0 if gsd <= 1 else 1 if gsd <= 3 else 2]


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
        crs, tf = _place(i, r, gsd, sites[i % len(sites)])
        sensor = _sensor(dtype, gsd)
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
