"""Areas of interest: a GeoJSON or vector file per scene (or a STAC item's geometry), on the scene's grid.

Ingest reads the AOI in its own CRS, reprojects it to the scene's, clips it to the scene's footprint
and records the result in ``scenes.json`` (GeoJSON in the scene's CRS); tiling, scoring and maps
rasterise that geometry (pixel centres, as labels are) one window at a time, so memory stays flat.
Pixels outside the AOI count as nodata for ``tile.max_nodata``, carry no label, and are nodata in maps.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from rasterio.crs import CRS
from rasterio.features import geometry_mask
from rasterio.warp import transform_geom
from rasterio.windows import Window

from tilepipe.errors import bad_file
from tilepipe.geo.labels import _geojson_crs, is_geojson
from tilepipe.geo.raster_io import Grid
from tilepipe.geo.remote import is_remote, read_remote_bytes

WGS84 = CRS.from_epsg(4326)
SEGMENTS = 64  # edges are split into about this many pieces per side of the AOI's box before reprojecting


@dataclass(frozen=True)
class SceneAoi:
    """A scene's AOI as ``scenes.json`` records it (see ``SceneRecord``)."""

    source: str  # the file, or the STAC item whose geometry it is
    sha256: str  # of the file, or of the item's geometry as JSON
    geometry: dict[str, Any]  # GeoJSON, in the scene's CRS, clipped to the scene
    area_km2: float
    fraction: float  # of the scene's footprint


def _polygonal(geom: shapely.Geometry, where: str, path: Path | str) -> shapely.Geometry:
    """The polygons of a geometry; a line, a point or an invalid ring is one line naming the file."""
    if geom is None or geom.is_empty:
        raise bad_file(path, f"{where} has an empty geometry")
    if geom.geom_type == "GeometryCollection":
        geom = shapely.unary_union([g for g in geom.geoms if g.geom_type in ("Polygon", "MultiPolygon")])
    if geom.geom_type not in ("Polygon", "MultiPolygon") or geom.is_empty:
        raise bad_file(path, f"{where} is a {geom.geom_type}: an area of interest needs polygons")
    if not geom.is_valid:
        raise bad_file(path, f"{where} has an invalid geometry ({shapely.is_valid_reason(geom)})")
    return geom


def _geojson(path: Path | str) -> tuple[shapely.Geometry, CRS]:
    try:
        doc = json.loads(read_remote_bytes(path) if is_remote(path) else Path(path).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_file(path, f"not valid GeoJSON ({exc})") from None
    kind = doc.get("type") if isinstance(doc, dict) else None
    features = doc.get("features") if kind == "FeatureCollection" else [doc] if kind == "Feature" else None
    geometries = [f.get("geometry") for f in features] if isinstance(features, list) else [doc]
    shapes = []
    for number, geometry in enumerate(geometries):
        try:
            shapes.append(_polygonal(shapely.geometry.shape(geometry), f"feature {number}", path))
        except (AttributeError, TypeError, ValueError, KeyError, shapely.errors.GEOSException):
            raise bad_file(path, f"feature {number} has a malformed geometry") from None
    if not shapes:
        raise bad_file(path, "holds no features, so no area of interest")
    return shapely.unary_union(shapes), _geojson_crs(doc, path)


def _vector(path: Path | str) -> tuple[shapely.Geometry, CRS]:
    """Any vector format GDAL reads (GeoPackage, Shapefile, FlatGeobuf, KML, ...), through pyogrio."""
    import pyogrio  # here: only a non-GeoJSON AOI needs it
    import pyogrio.errors

    try:
        meta, _, wkb, _ = pyogrio.raw.read(str(path), read_geometry=True, columns=[])
    except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError) as exc:
        raise bad_file(path, f"not a readable vector file ({str(exc).splitlines()[0]})") from None
    if len(wkb) == 0:
        raise bad_file(path, "holds no features, so no area of interest")
    if not meta.get("crs"):
        raise bad_file(path, "the vector file has no CRS; give it one (e.g. ogr2ogr -a_srs)")
    shapes = [_polygonal(shapely.from_wkb(g), f"feature {i}", path) for i, g in enumerate(wkb)]
    return shapely.unary_union(shapes), CRS.from_user_input(meta["crs"])


def read_aoi(location: Path | str) -> tuple[shapely.Geometry, CRS]:
    """An AOI file's polygons, united, and their CRS (GeoJSON: lon/lat unless a ``crs`` member says)."""
    if not is_remote(location) and not Path(location).is_file():
        raise bad_file(location, "AOI file not found")
    return _geojson(location) if is_geojson(location) else _vector(location)


def aoi_file(location: Path | str) -> tuple[dict[str, Any], str]:
    """An AOI file as (GeoJSON geometry, CRS), as ``AoiMask`` takes it."""
    geom, crs = read_aoi(location)
    return shapely.geometry.mapping(geom), crs.to_string()


def _footprint(transform, width: int, height: int) -> shapely.Polygon:
    corners = [transform * xy for xy in ((0, 0), (width, 0), (width, height), (0, height))]
    return shapely.Polygon(corners)


def reproject(geom: shapely.Geometry, src: CRS, dst: CRS) -> shapely.Geometry:
    """``geom`` in ``dst``; edges densified first, so they bend as they should in the other CRS."""
    if src == dst:
        return geom
    left, bottom, right, top = geom.bounds
    dense = shapely.segmentize(geom, max(right - left, top - bottom, 1e-9) / SEGMENTS)
    return shapely.make_valid(shapely.geometry.shape(transform_geom(src, dst, dense.__geo_interface__)))


def scene_aoi(
    source: str, geom: shapely.Geometry, crs: CRS, sha256: str, src, image: Path | str, gsd_m: float
) -> SceneAoi:
    """The AOI on an opened scene: reprojected, clipped to its footprint, its area; missing it is one line."""
    footprint = _footprint(src.transform, src.width, src.height)
    inside = shapely.intersection(reproject(geom, crs, src.crs), footprint)
    inside = shapely.unary_union([g for g in getattr(inside, "geoms", [inside]) if g.area > 0])
    if inside.is_empty or inside.area <= 0:
        raise bad_file(source, f"the area of interest does not overlap its scene {Path(str(image)).name}")
    fraction = min(inside.area / footprint.area, 1.0)
    area_km2 = fraction * src.width * src.height * gsd_m**2 / 1e6
    return SceneAoi(source, sha256, shapely.geometry.mapping(inside), round(area_km2, 6), round(fraction, 4))


def geometry_sha256(geometry: dict[str, Any]) -> str:
    """SHA-256 of a GeoJSON geometry as canonical JSON (a STAC item's AOI, a tiling fingerprint)."""
    return hashlib.sha256(json.dumps(geometry, sort_keys=True).encode()).hexdigest()


class AoiMask:
    """Which pixels of a grid's windows lie inside an AOI (pixel centres), window by window."""

    def __init__(self, geometry: dict[str, Any], crs: CRS | str, grid: Grid) -> None:
        self.grid = grid
        self.geom = reproject(shapely.geometry.shape(geometry), CRS.from_user_input(crs), grid.crs)
        shapely.prepare(self.geom)
        footprint = _footprint(grid.transform, grid.width, grid.height)
        self.empty = shapely.intersection(self.geom, footprint).area <= 0  # misses the grid

    def inside(self, window: Window) -> np.ndarray:
        """(rows, cols) True inside the AOI; a window may pass the grid's edge."""
        shape = (int(window.height), int(window.width))
        box = shapely.box(*self.grid.window_bounds(window))
        if shapely.contains(self.geom, box):
            return np.ones(shape, dtype=bool)
        part = shapely.intersection(self.geom, box)
        if part.is_empty or part.area <= 0:
            return np.zeros(shape, dtype=bool)
        return geometry_mask([part], shape, self.grid.window_transform(window), invert=True)
