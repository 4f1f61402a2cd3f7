"""One catalog scene, as a CSV row or a STAC item names it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tilepipe.errors import TilepipeError

SCENE_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")  # it names a folder: no "..", no hidden names
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class CatalogRow:
    """One scene as the catalog names it; paths are resolved against the catalog file's folder.

    A STAC item also gives its bands' names, its sensor, its time and its label classes, and
    ``origin`` ("items/a.json (item a)") so that a problem with its files names the item too.
    """

    scene_id: str
    image: Path | str  # a local file, or an s3:// / https:// URI
    labels: Path | str
    split: str | None
    bands: str | None
    band_labels: tuple[str | None, ...] | None = None
    sensor: str | None = None
    datetime: str | None = None
    label_classes: tuple[str | int, ...] | None = None
    origin: str | None = None
    aoi: Path | str | dict | None = None  # an AOI file, or a STAC item's geometry (GeoJSON, lon/lat)


@contextmanager
def naming_origin(row: CatalogRow) -> Iterator[None]:
    """Prefix a one-line error about a scene's files with the catalog entry that names them."""
    try:
        yield
    except TilepipeError as exc:
        if row.origin is None:
            raise
        raise TilepipeError(f"{row.origin}: {exc}") from None
