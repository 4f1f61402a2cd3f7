"""The scenes of an archive to map: a CSV or STAC catalog, a folder or an ``s3://`` prefix of GeoTIFFs.

A catalog is read as ``data.catalog`` is (band mappings, STAC band names, sensor and time), but
its labels are ignored. In a folder or under a prefix every ``.tif`` / ``.tiff`` is a scene (hidden
files and folders and the output folder left out); its id is its path below the folder without the
suffix, ``/`` as ``_`` (``2024/03/a.tif`` -> ``2024_03_a``), its bands are named by the file.

A scene's fingerprint is the one ingest records: a local file's SHA-256, a remote one's ETag,
size and last-modified time (from the bucket's listing for a prefix: no request per scene).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tilepipe.errors import TilepipeError, bad_file
from tilepipe.fsutil import file_sha256
from tilepipe.geo.bands import band_names, parse_band_mapping
from tilepipe.geo.catalog import read_catalog
from tilepipe.geo.objects import list_objects
from tilepipe.geo.raster_io import gdal_env, open_raster
from tilepipe.geo.remote import is_remote, remote_stat, shown
from tilepipe.geo.scene_row import SCENE_ID, CatalogRow
from tilepipe.params import StacParams

SUFFIXES = (".tif", ".tiff")
NOT_IN_ID = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class ArchiveScene:
    """One scene to map: its image, how to find the model's bands in it, and what the catalog says."""

    scene_id: str
    image: Path | str  # a local file, or an s3:// / https:// URI
    bands: str | None = None  # a catalog mapping, e.g. red=3;green=2;blue=1
    band_labels: tuple[str | None, ...] | None = None  # STAC band names
    sensor: str | None = None
    datetime: str | None = None  # ISO 8601, from a STAC item
    origin: str | None = None  # the catalog entry naming it, for messages
    fingerprint: str | None = None  # known from a bucket listing; else computed by :func:`fingerprint`

    def band_spec(self) -> dict[str, Any]:
        """What makes the model's bands: part of a map's key (a changed mapping changes the map)."""
        return {"bands": self.bands, "band_labels": self.band_labels, "sensor": self.sensor}


def is_catalog_file(location: str | Path) -> bool:
    """True for a CSV or JSON catalog; False for a folder or an ``s3://`` prefix of GeoTIFFs."""
    return not is_remote(location) and Path(location).is_file()


def list_scenes(
    location: str | Path, stac: StacParams, exclude: str | Path | None = None
) -> list[ArchiveScene]:
    """The archive's scenes, in order of scene id; ``exclude`` (the output) is never one of them."""
    if str(location).startswith("s3://"):
        scenes = _prefix_scenes(str(location), str(exclude or ""))
    elif is_remote(location):
        raise TilepipeError(
            f"{shown(location)}: a catalog is a CSV or STAC file, a folder or an s3:// prefix"
        )
    elif is_catalog_file(location):
        rows = read_catalog(location, stac.image_asset, stac.labels_asset, labels=False)
        scenes = [
            ArchiveScene(r.scene_id, _absolute(r.image), r.bands, r.band_labels, r.sensor, r.datetime,
                         r.origin)  # fmt: skip
            for r in rows
        ]
    elif Path(location).is_dir():
        scenes = _folder_scenes(Path(location), exclude)
    else:
        raise bad_file(location, "catalog not found (a CSV or STAC file, a folder or an s3:// prefix)")
    if not scenes:
        raise bad_file(location, "holds no scenes (.tif / .tiff files)")
    return sorted(scenes, key=lambda s: s.scene_id)


def _absolute(image: Path | str) -> Path | str:
    """A local path made absolute (a Dask worker's working directory may be another); a URI as it is."""
    return image if is_remote(image) else Path(os.path.abspath(image))


def _scene_id(relative: str, where: str | Path, seen: dict[str, str]) -> str:
    """The id of a file at ``relative`` below the archive's folder; two files with one id are an error."""
    stem = relative.rsplit(".", 1)[0]
    scene_id = NOT_IN_ID.sub("_", stem.replace("/", "_"))
    if not SCENE_ID.fullmatch(scene_id):
        scene_id = f"_{scene_id}"
    if scene_id in seen:
        raise bad_file(where, f"{seen[scene_id]} and {relative} would both be scene {scene_id}: rename one")
    seen[scene_id] = relative
    return scene_id


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def _folder_scenes(folder: Path, exclude: str | Path | None) -> list[ArchiveScene]:
    skip = Path(exclude).resolve() if exclude and not is_remote(exclude) else None
    seen: dict[str, str] = {}
    scenes = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        dirs[:] = [d for d in dirs if not d.startswith(".") and (Path(root) / d).resolve() != skip]
        for name in sorted(files):
            path = Path(root) / name
            relative = path.relative_to(folder).as_posix()
            if name.lower().endswith(SUFFIXES) and not _hidden(relative):
                scenes.append(ArchiveScene(_scene_id(relative, folder, seen), _absolute(path)))
    return scenes


def _prefix_scenes(prefix: str, exclude: str) -> list[ArchiveScene]:
    folder = prefix.rstrip("/") + "/"
    skip = exclude.rstrip("/") + "/" if exclude.startswith("s3://") else None
    seen: dict[str, str] = {}
    scenes = []
    for uri, stat in list_objects(prefix):
        relative = uri.removeprefix(folder)
        if not relative.lower().endswith(SUFFIXES) or _hidden(relative) or (skip and uri.startswith(skip)):
            continue
        scenes.append(ArchiveScene(_scene_id(relative, prefix, seen), uri, fingerprint=stat.fingerprint))
    return scenes


def fingerprint(scene: ArchiveScene) -> str:
    """The scene's content fingerprint, as ingest computes it; one line naming the file when unreadable."""
    if scene.fingerprint:
        return scene.fingerprint
    if is_remote(scene.image):
        return remote_stat(str(scene.image)).fingerprint
    try:
        return file_sha256(scene.image)
    except FileNotFoundError:
        raise bad_file(scene.image, "file not found") from None
    except OSError as exc:
        raise bad_file(scene.image, f"cannot be read ({exc.strerror or exc})") from None


def model_bands(scene: ArchiveScene, cache_mb: int = 64) -> str | dict[str, int] | None:
    """The bands argument of ``predict_scene``: the catalog's mapping, or names from the STAC item."""
    if scene.band_labels is None and scene.sensor is None:
        return scene.bands
    with gdal_env(cache_mb), open_raster(scene.image) as src:
        return band_names(src, parse_band_mapping(scene.bands, scene.image), scene.band_labels, scene.sensor)


def as_row(scene: ArchiveScene) -> CatalogRow:
    """The scene as a catalog row, for :func:`naming_origin` (errors about its files name its item)."""
    return CatalogRow(scene.scene_id, scene.image, "", None, scene.bands, origin=scene.origin)
