"""Ingest stage: validate every scene of the catalog and record its metadata."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from rasterio.errors import RasterioError

from tilepipe.errors import TilepipeError
from tilepipe.fsutil import relative_to_cwd, write_json
from tilepipe.geo.catalog import read_catalog
from tilepipe.geo.raster_io import gdal_env
from tilepipe.geo.scenes import inspect_scene
from tilepipe.params import Params
from tilepipe.redaction import redact_text


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def ingest(params: Params, catalog: Path, out: Path) -> dict[str, Any]:
    """Validate the catalog's scenes and write the normalised catalog (JSON) to ``out``."""
    stac = params.data.stac
    rows = read_catalog(catalog, stac.image_asset, stac.labels_asset, stac.use_geometry)
    scenes, skipped = [], []
    with gdal_env(params.tile.gdal_cache_mb):
        for row in rows:
            try:
                scenes.append(inspect_scene(row, params, warn=_warn))
            except (TilepipeError, RasterioError) as exc:
                message = redact_text(exc if isinstance(exc, TilepipeError) else f"{row.image}: {exc}")
                if row.origin and not message.startswith(row.origin):
                    message = f"{row.origin}: {message}"
                if params.ingest.on_error == "fail":
                    raise TilepipeError(message) from None
                print(f"warning: skipping scene {row.scene_id}: {message}", file=sys.stderr)
                skipped.append({"scene_id": row.scene_id, "error": message})
                continue
            s = scenes[-1]
            print(
                f"ingest {s.scene_id}: {s.width}x{s.height} {s.dtype} {s.crs} "
                f"{s.gsd_m:g} m, nodata {s.nodata_fraction:.0%}, labels {s.labels_kind}"
                + (f", AOI {s.aoi_area_km2:g} km2 ({s.aoi_fraction:.0%} of the scene)" if s.aoi else "")
            )
    if not scenes:
        raise TilepipeError(f"{catalog}: no valid scene left after ingest")
    records = [s.to_dict() for s in scenes]
    result = {"catalog": relative_to_cwd(catalog), "scenes": records, "skipped": skipped}
    write_json(out, result)
    return result
