"""A mapped scene's STAC item, and the summary row read back from it.

The item of ``tilepipe/mapping/stac_item.py`` (footprint, grid, classes, model, source link) with
what the archive needs: the map's key, the model's SHA-256, the class areas, the nodata share, the
mean confidence and the scene's megapixels, and links to ``../collection.json``. It is written last
and holds no timing, so the same inputs give the same bytes.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pystac

from tilepipe.fsutil import write_json
from tilepipe.geo.remote import is_remote, remote_stat
from tilepipe.mapping.sources import ArchiveScene
from tilepipe.mapping.stac_item import build_item, source_datetime
from tilepipe.ml.checkpoint import ModelMeta

KEY = "tilepipe:map_key"
COLLECTION_ID = "tilepipe-maps"
COLLECTION_FILE = "collection.json"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # STAC needs a time: for a scene whose time is not known at all


def file_time(image: Path | str) -> str | None:
    """When the scene's file was last written (UTC, ISO 8601): its mtime, or the store's Last-Modified."""
    try:
        if not is_remote(image):
            return datetime.fromtimestamp(os.stat(image).st_mtime, UTC).replace(microsecond=0).isoformat()
        modified = remote_stat(str(image)).modified
        when = datetime.fromisoformat(modified) if "T" in modified else parsedate_to_datetime(modified)
        return when.astimezone(UTC).replace(microsecond=0).isoformat()
    except (OSError, ValueError, TypeError):
        return None


def layout(meta: ModelMeta, probabilities: bool, confidence: bool) -> str:
    """The asset's description: what each band holds."""
    text = "band 1: class index (255 nodata)"
    first = 2
    if confidence:
        text += "; band 2: confidence, the top class's probability x 255 (at most 254)"
        first = 3
    if probabilities:
        text += f"; bands {first}..: probability of each class x 255 (" + ", ".join(meta.classes) + ")"
    return text


def archive_item(
    output: Path, scene: ArchiveScene, meta: ModelMeta, model, key: str, stats: dict[str, Any], options,
    store, engine: str = "torch",
) -> dict[str, Any]:  # fmt: skip
    """Write the item of a scene's map beside it (``<scene_id>.json``); returns it as a dict.

    ``engine``: the inference engine that made the map (``tilepipe:engine``).

    ``datetime``: the scene's (STAC item, else TIFF tag), else its file's last write
    (``tilepipe:datetime_source``: ``scene`` or ``file``), never the time of this run.
    """
    when = source_datetime(scene.image, scene.datetime)
    fallback = None if when is not None else file_time(scene.image)
    local_out = not str(store.location).startswith("s3://")
    folder = Path(store.location) / scene.scene_id if local_out else None
    known = when.isoformat() if when else fallback
    item = build_item(output, scene.image, meta, model.described, scene.scene_id, known, EPOCH, folder)
    props = item.properties
    props["tilepipe:datetime_source"] = "scene" if when else ("file" if fallback else "unknown")
    if not local_out and not is_remote(scene.image):  # a local scene seen from a bucket: its absolute path
        item.get_single_link("derived_from").target = Path(scene.image).resolve().as_uri()
    item.assets["map"].description = layout(meta, options.probabilities, options.confidence)
    props.update({
        KEY: key,
        "tilepipe:scene_megapixels": round(stats["scene_pixels"] / 1e6, 6),
        "tilepipe:class_area_ha": dict(zip(meta.classes, stats["class_hectares"], strict=True)),
        "tilepipe:nodata_fraction": stats["nodata_fraction"],
        "tilepipe:mean_confidence": stats["mean_confidence"],
        "tilepipe:engine": engine,
    })  # fmt: skip
    item.collection_id = COLLECTION_ID
    for rel in ("collection", "parent", "root"):
        item.add_link(pystac.Link(rel, f"../{COLLECTION_FILE}", pystac.MediaType.JSON, "the archive's maps"))
    raw = item.to_dict(include_self_link=False, transform_hrefs=False)
    write_json(output.with_suffix(".json"), raw)
    return raw


def item_row(item: dict[str, Any], status: str) -> dict[str, Any]:
    """A scene's summary row from its item: megapixels, nodata share, mean confidence, hectares per class."""
    props = item["properties"]
    return {
        "scene_id": item["id"],
        "status": status,
        "seconds": 0.0,
        "megapixels": props.get("tilepipe:scene_megapixels"),
        "nodata_fraction": props.get("tilepipe:nodata_fraction"),
        "mean_confidence": props.get("tilepipe:mean_confidence"),
        "class_area_ha": props.get("tilepipe:class_area_ha") or {},
        "problem": "",
    }
