"""A STAC item beside each predicted map, and the catalog of the held-out scenes' maps.

The item (``<map stem>.json``) holds the map's footprint in EPSG:4326, its grid (projection
extension v2: ``proj:code`` or ``proj:wkt2``, ``proj:transform``, ``proj:shape``), its classes
(classification extension v2, with the maps' colours), the model that made it and a
``derived_from`` link to the source scene. Hrefs are relative where the files are local, so a
folder of maps can be moved, opened in a STAC browser or QGIS as it is.
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pystac
import rasterio
from pystac.extensions.classification import Classification, ClassificationExtension
from pystac.extensions.projection import ProjectionExtension
from rasterio.crs import CRS
from rasterio.warp import transform as warp_points

from tilepipe.errors import bad_file
from tilepipe.fsutil import write_json
from tilepipe.geo.raster_io import gdal_env
from tilepipe.mapping.blend import NODATA
from tilepipe.mapping.scene import class_colours
from tilepipe.mapping.writer import CONFIDENCE
from tilepipe.ml.checkpoint import ModelMeta
from tilepipe.redaction import redact

COG = "image/tiff; application=geotiff; profile=cloud-optimized"
GEOTIFF = "image/tiff; application=geotiff"
EDGE_POINTS = 21  # points per footprint edge: a straight edge in the map's CRS bends in EPSG:4326
DECIMALS = 7  # degrees: about a centimetre
TIFF_DATETIME = "%Y:%m:%d %H:%M:%S"  # TIFFTAG_DATETIME (no time zone: read as UTC)
NAME_OK = re.compile(r"[^0-9A-Za-z_-]")  # classification v2 class names: [0-9A-Za-z-_]+
RESERVED = ("catalog", "predictions")  # names of the other JSON files of a predictions folder


def item_path(map_path: Path) -> Path:
    """Where the item of a map goes: ``<map stem>.json`` beside it."""
    path = Path(map_path).with_suffix(".json")
    if path == Path(map_path) or path.stem in RESERVED:
        raise bad_file(map_path, f"its STAC item would be {path}: name the map otherwise")
    return path


def source_href(scene: str | Path, folder: Path) -> str:
    """The scene as a link target: relative to ``folder`` when local, a URL when remote."""
    text = str(scene)
    for prefix, scheme in (("/vsis3/", "s3://"), ("/vsigs/", "gs://"), ("/vsiaz/", "az://")):
        if text.startswith(prefix):
            return scheme + text.removeprefix(prefix)
    if text.startswith(("/vsicurl/", "/vsicurl?")):
        return text.removeprefix("/vsicurl/")
    if "://" in text:
        return redact(text)  # no user info or query string (a presigned link's signature)
    return Path(os.path.relpath(Path(text).resolve(), Path(folder).resolve())).as_posix()


def footprint(bounds: Any, crs: CRS) -> tuple[dict[str, Any], list[float]]:
    """The bounds' outline in EPSG:4326 (densified edges) as a GeoJSON polygon, and its bbox."""
    left, bottom, right, top = bounds
    steps = [i / (EDGE_POINTS - 1) for i in range(EDGE_POINTS - 1)]
    xs = [left + (right - left) * t for t in steps] + [right] * len(steps)
    ys = [top] * len(steps) + [top - (top - bottom) * t for t in steps]
    xs += [right - (right - left) * t for t in steps] + [left] * len(steps)
    ys += [bottom] * len(steps) + [bottom + (top - bottom) * t for t in steps]
    lons, lats = warp_points(crs, "EPSG:4326", xs, ys)
    ring = [[round(x, DECIMALS), round(y, DECIMALS)] for x, y in zip(lons, lats, strict=True)]
    ring.append(ring[0])
    lons, lats = [p[0] for p in ring], [p[1] for p in ring]
    bbox = [min(lons), min(lats), max(lons), max(lats)]
    return {"type": "Polygon", "coordinates": [ring]}, bbox


def source_datetime(scene: str | Path, known: str | None) -> datetime | None:
    """The scene's acquisition time: ``known`` (ISO 8601, e.g. from a STAC item), else its TIFF tag."""
    if known:
        return pystac.utils.str_to_datetime(known)
    try:
        with gdal_env(), rasterio.open(scene) as src:  # gdal_env: the settings for an s3:// scene
            stamp = src.tags().get("TIFFTAG_DATETIME", "")
        return datetime.strptime(stamp.strip(), TIFF_DATETIME).replace(tzinfo=UTC)
    except (rasterio.errors.RasterioError, ValueError):
        return None


def map_classes(classes: list[str]) -> list[Classification]:
    """Band 1's values: a class each (name, description, the map's colour), and 255 as nodata."""
    out = []
    for value, (name, rgb) in enumerate(zip(classes, class_colours(classes), strict=True)):
        hint = "".join(f"{c:02X}" for c in rgb)
        safe = NAME_OK.sub("_", name)
        out.append(Classification.create(value, description=name, name=safe, color_hint=hint))
    out.append(Classification.create(NODATA, description="no data", name="nodata", nodata=True))
    return out


def band_layout(classes: list[str], descriptions: list[str | None]) -> str:
    """What the map's bands hold, from their descriptions (class, per-class probabilities, confidence)."""
    n = len(descriptions)
    probabilities = n - 1 >= len(classes) and not (n == 2 and descriptions[1] == CONFIDENCE)
    layout = "band 1: class index (255 nodata)"
    if probabilities:
        layout += f"; bands 2-{len(classes) + 1}: probability of each class x 255 ({', '.join(classes)})"
    if n - 1 - (len(classes) if probabilities else 0) == 1:
        layout += f"; band {n}: top-class probability x 255 (confidence)"
    return layout


def model_properties(meta: ModelMeta, model: dict[str, Any]) -> dict[str, Any]:
    """The model in the item's properties: ``model`` holds name, version, run_id, source (when known)."""
    props = {f"tilepipe:model_{k}": v for k, v in model.items() if v not in (None, "")}
    props.update({
        "tilepipe:architecture": meta.model,
        "tilepipe:task": meta.task,
        "tilepipe:model_epoch": meta.epoch,
        "tilepipe:bands": list(meta.bands),  # the model's input contract: bands, GSD, normalisation
        "tilepipe:gsd": meta.gsd,
        "tilepipe:gsd_range": meta.gsd_range,
        "tilepipe:normalize": meta.norm.mode,
    })  # fmt: skip
    return props


def build_item(
    map_path: Path,
    scene: str | Path,
    meta: ModelMeta,
    model: dict[str, Any],
    item_id: str | None = None,
    scene_datetime: str | None = None,
    created: datetime | None = None,
    folder: Path | None = None,
) -> pystac.Item:
    """The STAC item of a written map (COG) predicted from ``scene``.

    ``datetime`` is the scene's (``scene_datetime``, else its TIFFTAG_DATETIME); when neither is
    known it is ``created`` (default: now), and ``tilepipe:datetime_source`` says which it is.
    ``folder``: where the item will be read from, for the scene's relative href (default: the map's).
    """
    map_path = Path(map_path)
    with rasterio.open(map_path) as src:
        crs, transform, bounds, descriptions = src.crs, src.transform, src.bounds, src.descriptions
        shape, mean_confidence = (src.height, src.width), src.tags().get("TILEPIPE_MEAN_CONFIDENCE")
    geometry, bbox = footprint(bounds, crs)
    when = source_datetime(scene, scene_datetime)
    props = {"tilepipe:datetime_source": "scene" if when else "prediction", **model_properties(meta, model)}
    props["tilepipe:temperature"] = meta.temperature
    if mean_confidence is not None:
        props["tilepipe:mean_confidence"] = float(mean_confidence)
    when = when or (created or datetime.now(UTC)).replace(microsecond=0)
    item = pystac.Item(item_id or map_path.stem, geometry, bbox, when, props)
    proj = ProjectionExtension.ext(item, add_if_missing=True)
    epsg = crs.to_epsg()
    if epsg:
        proj.code = f"EPSG:{epsg}"
    else:
        proj.wkt2 = crs.to_wkt(version="WKT2_2019")
    proj.transform, proj.shape, proj.bbox = list(transform)[:6], list(shape), list(bounds)
    layout = band_layout(list(meta.classes), list(descriptions))
    asset = pystac.Asset(f"./{map_path.name}", title=f"{meta.task} map", description=layout, media_type=COG,
                         roles=["data"])  # fmt: skip
    item.add_asset("map", asset)
    ClassificationExtension.ext(asset, add_if_missing=True).classes = map_classes(list(meta.classes))
    href = source_href(scene, folder or map_path.parent)
    item.add_link(pystac.Link("derived_from", href, media_type=GEOTIFF, title="source scene"))
    return item


def write_item(item: pystac.Item, path: Path) -> Path:
    """Write ``item`` as JSON (relative hrefs kept as they are, no self link), atomically."""
    write_json(Path(path), item.to_dict(include_self_link=False, transform_hrefs=False))
    return Path(path)


def write_catalog(folder: Path, items: list[pystac.Item], title: str) -> Path:
    """``folder/catalog.json`` and ``folder/<item id>.json``: a self-contained catalog (relative hrefs)."""
    folder = Path(folder)
    catalog = pystac.Catalog(
        "predictions",
        "Maps of the test scenes held out whole, each with its STAC item (tilepipe predict --test-scenes).",
        title=title,
        catalog_type=pystac.CatalogType.SELF_CONTAINED,
    )
    catalog.add_link(pystac.Link("root", "./catalog.json", pystac.MediaType.JSON, title))
    for item in sorted(items, key=lambda i: i.id):
        item.add_link(pystac.Link("root", "./catalog.json", pystac.MediaType.JSON, title))
        item.add_link(pystac.Link("parent", "./catalog.json", pystac.MediaType.JSON, title))
        write_item(item, item_path(folder / f"{item.id}.tif"))
        catalog.add_link(pystac.Link("item", f"./{item.id}.json", pystac.MediaType.GEOJSON, item.id))
    write_json(folder / "catalog.json", catalog.to_dict(include_self_link=False, transform_hrefs=False))
    return folder / "catalog.json"
