"""What a mapping run leaves at the top of DIR: the STAC Collection of every map, and ``summary.csv``.

``collection.json`` links every scene's item (``./<scene_id>/<scene_id>.json``) and gives their
spatial and temporal extent, the classes (``classification:classes`` in its summaries) and the model
of the latest run. A later run updates it: every field it holds is kept (a title or licence a team
added), its extent and item links are those of every item in DIR.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import pystac
from pystac.extensions.classification import ClassificationExtension

from tilepipe.mapping.outputs import item_name
from tilepipe.mapping.records import COLLECTION_FILE, COLLECTION_ID
from tilepipe.mapping.stac_item import map_classes, model_properties
from tilepipe.ml.checkpoint import ModelMeta

DESCRIPTION = "Maps of an archive of scenes made by tilepipe (`tilepipe map`), a STAC item per scene."
SUMMARY_FILE = "summary.csv"
FIELDS = ("scene_id", "status", "seconds", "megapixels", "nodata_fraction", "mean_confidence")
ORDER = ("type", "stac_version", "stac_extensions", "id", "title", "description", "keywords", "license",
         "providers", "extent", "summaries", "links", "assets")  # fmt: skip  (then the others, sorted)


def _extent(items: list[dict[str, Any]]) -> pystac.Extent:
    boxes = [item["bbox"] for item in items]
    bbox = [
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    ]
    times = sorted(pystac.utils.str_to_datetime(item["properties"]["datetime"]) for item in items)
    return pystac.Extent(pystac.SpatialExtent([bbox]), pystac.TemporalExtent([[times[0], times[-1]]]))


def collection_dict(
    existing: dict[str, Any] | None, items: dict[str, dict[str, Any]], meta: ModelMeta, model: dict[str, Any]
) -> dict[str, Any]:
    """The collection of ``items`` (by scene id), made from ``existing`` when there is one."""
    listed = [items[k] for k in sorted(items)]
    extent = (
        _extent(listed)
        if listed
        else pystac.Extent(
            pystac.SpatialExtent([[-180.0, -90.0, 180.0, 90.0]]), pystac.TemporalExtent([[None, None]])
        )
    )
    if existing is not None:
        collection = pystac.Collection.from_dict(existing, preserve_dict=True, migrate=False)
        collection.extent = extent
    else:
        collection = pystac.Collection(COLLECTION_ID, DESCRIPTION, extent, title="tilepipe maps",
                                       catalog_type=pystac.CatalogType.SELF_CONTAINED)  # fmt: skip
    collection.clear_links()
    title = collection.title or COLLECTION_ID
    collection.add_link(pystac.Link("root", f"./{COLLECTION_FILE}", pystac.MediaType.JSON, title))
    for item in listed:
        collection.add_link(
            pystac.Link("item", f"./{item_name(item['id'])}", pystac.MediaType.GEOJSON, item["id"])
        )
    ClassificationExtension.summaries(collection, add_if_missing=True).classes = map_classes(
        list(meta.classes)
    )
    for key in [k for k in collection.extra_fields if k.startswith("tilepipe:model")]:
        del collection.extra_fields[key]
    collection.extra_fields.update(model_properties(meta, model))
    raw = collection.to_dict(include_self_link=False, transform_hrefs=False)
    # one order whatever the collection's history, so the same maps give the same bytes
    return {k: raw[k] for k in (*[k for k in ORDER if k in raw], *sorted(set(raw) - set(ORDER)))}


def update_collection(
    store, items: dict[str, dict[str, Any]], meta: ModelMeta, model: dict[str, Any]
) -> dict:
    """Write ``DIR/collection.json`` for every item in DIR, keeping what the existing one holds."""
    text = store.read_text(COLLECTION_FILE)
    existing = json.loads(text) if text else None
    collection = collection_dict(existing, items, meta, model)
    updated = json.dumps(collection, indent=1) + "\n"
    if updated != text:  # unchanged: not rewritten
        store.write_text(COLLECTION_FILE, updated, "application/json")
    return collection


def summary_csv(rows: list[dict[str, Any]], classes: list[str]) -> str:
    """``summary.csv``: a row per scene of the run, the hectares of each class in a column each."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*FIELDS, *(f"area_ha_{name}" for name in classes), "problem"])
    for row in sorted(rows, key=lambda r: r["scene_id"]):
        areas = row.get("class_area_ha") or {}
        cells = [_cell(row.get(name)) for name in FIELDS]
        writer.writerow([*cells, *(_cell(areas.get(name)) for name in classes), row.get("problem", "")])
    return out.getvalue()


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


def totals(rows: list[dict[str, Any]]) -> dict[str, int]:
    """How many scenes of the run ended in each status."""
    counts = {"mapped": 0, "current": 0, "failed": 0, "busy": 0}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return counts
