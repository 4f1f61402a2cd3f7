"""The scene catalog contract: a CSV with scene_id,image,labels[,split][,bands], or a STAC catalog."""

from __future__ import annotations

import csv
from pathlib import Path

from tilepipe.errors import bad_file
from tilepipe.fsutil import input_problem
from tilepipe.geo.remote import beside
from tilepipe.geo.scene_row import SCENE_ID, SPLITS, CatalogRow, naming_origin
from tilepipe.geo.stac import read_stac

__all__ = ["CatalogRow", "naming_origin", "read_catalog", "SPLITS"]

REQUIRED = ("scene_id", "image", "labels")
OPTIONAL = ("split", "bands", "aoi")


def is_stac(path: Path) -> bool:
    """True when the catalog file is JSON (a STAC Catalog, Collection or ItemCollection), not a CSV."""
    with open(path, "rb") as fh:
        return fh.read(256).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{")


def read_catalog(
    path: Path | str,
    image_asset: str | None = None,
    labels_asset: str | None = None,
    use_geometry: bool = False,
    labels: bool = True,
) -> list[CatalogRow]:
    """Read and check a CSV or STAC catalog; any problem is one error naming the file.

    ``use_geometry``: a STAC item's geometry is its scene's area of interest.
    ``labels=False`` (mapping an archive): labels are neither needed nor read; rows have labels "".
    """
    path = Path(path)
    if problem := input_problem(path, missing="catalog not found"):
        raise bad_file(path, problem)
    if is_stac(path):
        return read_stac(path, image_asset, labels_asset, use_geometry, labels)
    try:
        return _check_rows(path, _read_rows(path, labels), labels)
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise bad_file(
            path, f"line {line}: byte 0x{exc.object[exc.start]:02x} is not UTF-8; save the catalog as UTF-8"
        ) from None


def _read_rows(path: Path, labels: bool = True) -> list[dict[str, str]]:
    """The catalog's rows as stripped strings, after checking the header and each row's width."""
    required = REQUIRED if labels else REQUIRED[:2]
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in required if c not in columns]
        if missing:
            raise bad_file(path, f"catalog lacks column(s) {', '.join(missing)} (needs {','.join(required)})")
        rows = []
        for record in reader:
            if None in record:  # csv puts fields past the header under None
                fields, named = len(columns) + len(record[None]), ",".join(columns)
                raise bad_file(
                    path,
                    f"line {reader.line_num}: {fields} fields but the header has {len(columns)} ({named}); "
                    'quote values holding commas; a bands mapping takes ";" (red=3;green=2;blue=1)',
                )
            rows.append({(k or "").strip(): (v or "").strip() for k, v in record.items()})
    return rows


def _check_rows(path: Path, rows: list[dict[str, str]], labels: bool = True) -> list[CatalogRow]:
    """Catalog rows checked one by one: ids, splits, files; paths relative to the catalog's folder."""
    if not rows:
        raise bad_file(path, "catalog lists no scenes")
    base = path.parent
    seen: set[str] = set()
    out: list[CatalogRow] = []
    for line, row in enumerate(rows, start=2):
        scene_id = row["scene_id"]
        if not SCENE_ID.fullmatch(scene_id):  # it names a folder: no "..", no hidden or temp names
            raise bad_file(
                path,
                f"line {line}: scene_id {scene_id!r} must be non-empty [A-Za-z0-9._-], not starting with '.'",
            )
        if scene_id in seen:
            raise bad_file(path, f"line {line}: duplicate scene_id {scene_id!r}")
        seen.add(scene_id)
        split = row.get("split") or None
        if split is not None and split not in SPLITS:
            raise bad_file(path, f"line {line}: split {split!r} must be one of {', '.join(SPLITS)}")
        for column in ("image", "labels") if labels else ("image",):
            if not row[column]:
                raise bad_file(path, f"line {line}: scene {scene_id!r} has no {column}")
        out.append(
            CatalogRow(
                scene_id=scene_id,
                image=beside(base, row["image"]),
                labels=beside(base, row["labels"]) if labels else "",
                split=split,
                bands=row.get("bands") or None,
                aoi=beside(base, row["aoi"]) if row.get("aoi") else None,
            )
        )
    return out
