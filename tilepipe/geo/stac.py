"""STAC catalogs as scene catalogs: one item is one scene (read with pystac, local JSON files).

``data.catalog`` may name a Catalog or Collection (items reached through child and item links,
recursively), an ItemCollection (a FeatureCollection of items) or a single Item. Relative hrefs
resolve against the JSON file that holds them. Every mistake is one line naming that JSON file
and the item.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pystac

from tilepipe.errors import bad_file
from tilepipe.fsutil import input_problem
from tilepipe.geo.bands import sensor_from
from tilepipe.geo.remote import is_remote
from tilepipe.geo.scene_row import SCENE_ID, SPLITS, CatalogRow
from tilepipe.redaction import redact

LINK_RELS = ("child", "item")
_PARSE_ERRORS = (pystac.STACError, KeyError, TypeError, ValueError, AttributeError)


def _load_json(path: Path, referrer: Path | None = None, rel: str = "") -> dict[str, Any]:
    """A JSON object from a local file; a missing target of a link is reported on the linking file."""
    if problem := input_problem(path, missing="file not found"):
        if referrer is not None:
            raise bad_file(referrer, f"broken {rel} link: {path}: {problem}")
        raise bad_file(path, problem)
    try:
        raw = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_file(path, f"not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise bad_file(path, "not a STAC object (the JSON is not an object)")
    return raw


def _local(href: str, base: Path, where: Path, what: str) -> Path:
    """A local file named by an href: relative ones resolve against ``base`` (the JSON's folder)."""
    if "://" in href or href.startswith("/vsi"):
        raise bad_file(where, f"{what} {redact(href)}: links between STAC files must be local files")
    return Path(os.path.normpath(base / href))  # an absolute href stays itself


def _walk(path: Path, raw: dict[str, Any], seen: set[Path]) -> Iterator[tuple[dict[str, Any], Path]]:
    """Every item dict under a STAC object, with the JSON file it was read from."""
    kind = raw.get("type")
    if kind == "Feature":
        yield raw, path
    elif kind == "FeatureCollection":
        for feature in raw.get("features") or []:
            yield feature, path
    elif kind in ("Catalog", "Collection"):
        for link in raw.get("links") or []:
            if not isinstance(link, dict) or link.get("rel") not in LINK_RELS:
                continue
            if not isinstance(link.get("href"), str):
                raise bad_file(path, f"a {link['rel']} link has no href")
            target = _local(link["href"], path.parent, path, f"{link['rel']} link")
            if target.resolve() not in seen:  # a link back up the tree is followed once
                seen.add(target.resolve())
                yield from _walk(target, _load_json(target, path, link["rel"]), seen)
    else:
        raise bad_file(path, f"not a STAC Catalog, Collection, Item or ItemCollection (type {kind!r})")


def _asset(item: pystac.Item, source: Path, role: str, key: str | None) -> tuple[str, Path | str]:
    """The item's asset named ``key``, else its one asset with ``role``; checked to exist locally."""
    where = f"item {item.id}"
    if key is not None:
        if key not in item.assets:
            assets = ", ".join(item.assets) or "none"
            raise bad_file(source, f"{where} has no asset {key!r} (assets: {assets})")
        chosen = [key]
    else:
        chosen = [k for k, a in item.assets.items() if role in (a.roles or [])]
        if not chosen:
            setting = "image_asset" if role == "data" else "labels_asset"
            raise bad_file(
                source,
                f"{where} has no asset with role {role!r} (assets: {', '.join(item.assets) or 'none'}); "
                f"give the roles or set data.stac.{setting}",
            )
        if len(chosen) > 1:
            setting = "image_asset" if role == "data" else "labels_asset"
            several = ", ".join(chosen)
            raise bad_file(
                source, f"{where} has several assets with role {role!r} ({several}): set data.stac.{setting}"
            )
    href = item.assets[chosen[0]].href
    if is_remote(href):  # read through GDAL; ingest checks that it answers
        return chosen[0], href
    path = _local(href, source.parent, source, f"{where}: asset {chosen[0]!r} href")
    if problem := input_problem(path):
        raise bad_file(source, f"{where}: asset {chosen[0]!r} ({href}): {problem}")
    return chosen[0], path


def _band_labels(item: pystac.Item, key: str) -> tuple[str | None, ...] | None:
    """Each band's common name (else its name) from ``eo:bands`` (STAC 1.0) or ``bands`` (STAC 1.1)."""
    fields = item.assets[key].extra_fields
    bands = fields.get("eo:bands") or fields.get("bands") or item.properties.get("eo:bands")
    if not isinstance(bands, list) or not bands:
        return None
    labels = []
    for band in bands:
        band = band if isinstance(band, dict) else {}
        labels.append(band.get("common_name") or band.get("eo:common_name") or band.get("name"))
    return tuple(labels)


def _label_classes(item: pystac.Item) -> tuple[str | int, ...] | None:
    """The classes the label extension's ``label:classes`` lists, or None."""
    groups = item.properties.get("label:classes")
    if not isinstance(groups, list):
        return None
    return tuple(c for g in groups if isinstance(g, dict) for c in (g.get("classes") or []))


def item_row(
    raw: dict[str, Any],
    source: Path,
    image_asset: str | None,
    labels_asset: str | None,
    use_geometry: bool = False,
    labels: bool = True,
) -> CatalogRow:
    """One STAC item as a catalog scene: image, labels, band names, sensor, time, split, classes (and AOI)."""
    try:
        item = pystac.Item.from_dict(raw, preserve_dict=True)
    except _PARSE_ERRORS as exc:
        raise bad_file(source, f"item {raw.get('id', '?')}: not a valid STAC item ({exc!r})") from None
    if not SCENE_ID.fullmatch(item.id):
        raise bad_file(source, f"item id {item.id!r} names a scene: [A-Za-z0-9._-], not starting with '.'")
    image_key, image = _asset(item, source, "data", image_asset)
    label_file = _asset(item, source, "labels", labels_asset)[1] if labels else ""
    props = item.properties
    split = props.get("tilepipe:split")
    if split is not None and split not in SPLITS:
        raise bad_file(source, f"item {item.id}: tilepipe:split {split!r} must be one of {', '.join(SPLITS)}")
    when = item.datetime or item.common_metadata.start_datetime
    if use_geometry and not item.geometry:
        raise bad_file(source, f"item {item.id} has no geometry (data.stac.use_geometry makes it the AOI)")
    return CatalogRow(
        scene_id=item.id,
        image=image,
        labels=label_file,
        split=split,
        bands=None,
        band_labels=_band_labels(item, image_key),
        sensor=sensor_from(props.get("platform"), props.get("instruments"), props.get("constellation")),
        datetime=when.isoformat() if when else None,
        label_classes=_label_classes(item),
        origin=f"{source} (item {item.id})",
        aoi=item.geometry if use_geometry else None,
    )


def read_stac(
    path: Path,
    image_asset: str | None = None,
    labels_asset: str | None = None,
    use_geometry: bool = False,
    labels: bool = True,
) -> list[CatalogRow]:
    """Every item of a STAC catalog as a checked catalog row (ids unique: they name the scenes).

    ``labels=False``: the items' labels assets are neither needed nor checked.
    """
    rows: list[CatalogRow] = []
    where: dict[str, Path] = {}
    for raw, source in _walk(path, _load_json(path), {path.resolve()}):
        row = item_row(raw, source, image_asset, labels_asset, use_geometry, labels)
        if row.scene_id in where:
            raise bad_file(source, f"item {row.scene_id}: duplicate id (also in {where[row.scene_id]})")
        where[row.scene_id] = source
        rows.append(row)
    if not rows:
        raise bad_file(path, "STAC catalog holds no items")
    return rows
