"""Fixtures: tiny georeferenced rasters written on the fly from a seeded generator."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from rasterio.transform import from_origin

from tilepipe.params import load_params

pytest_plugins = [
    "tests.prefect_server",  # the `prefect_api` fixture: one real Prefect server per session
    "tests.s3_server",  # the `s3` fixture: one S3 server (moto, signatures checked) per session
    "tests.services_stack",  # the `services` fixture: the stack of `tilepipe services up`, once per session
]

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["water", "forest", "cropland", "urban", "bare"]

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def write_raster(
    path: Path,
    data: np.ndarray,
    crs: str = "EPSG:32633",
    transform=None,
    nodata=None,
    descriptions: list[str] | None = None,
) -> Path:
    """Write a (bands, rows, cols) array as a tiled GeoTIFF."""
    data = data if data.ndim == 3 else data[None]
    transform = transform or from_origin(500000, 4000000, 1.0, 1.0)
    profile = {
        "driver": "GTiff",
        "width": data.shape[2],
        "height": data.shape[1],
        "count": data.shape[0],
        "dtype": data.dtype.name,
        "crs": crs,
        "transform": transform,
        "nodata": nodata,
    }
    if data.shape[1] >= 16 and data.shape[2] >= 16:
        profile.update(tiled=True, blockxsize=16, blockysize=16)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        for i, name in enumerate(descriptions or []):
            dst.set_band_description(i + 1, name)
    return path


def dvc_project(tmp_path: Path, changes: dict[str, dict]) -> tuple[Path, dict[str, str]]:
    """A git repository at tmp_path/repo holding a copy of the project, ``changes`` merged into the
    sections of its params.yaml and committed; returns it and the environment to run tools in."""
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_repo(repo)
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in changes.items():
        raw[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
    }  # fmt: skip
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "copy"]):
        git = ["git", "-c", "init.defaultBranch=main", *args]
        subprocess.run(git, cwd=repo, env=env, check=True, capture_output=True)
    return repo, env


def cut_pixel_data(path: Path, keep: float = 0.6) -> Path:
    """Rewrite a GeoTIFF with its header first (COG layout, 64 px blocks), then cut it at ``keep``.

    The header and the first blocks stay readable: opening the file works, reading the last
    blocks fails, as with a download or a copy that stopped half-way.
    """
    import rasterio.shutil

    whole = path.with_name(f"{path.stem}.whole.tif")
    path.rename(whole)
    rasterio.shutil.copy(whole, path, driver="COG", BLOCKSIZE=64, OVERVIEWS="NONE", COMPRESS="DEFLATE")
    whole.unlink()
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def write_scene(
    folder: Path,
    scene_id: str,
    size: tuple[int, int] = (96, 80),
    seed: int = 0,
    crs: str = "EPSG:32633",
    res: float = 1.0,
    origin: tuple[float, float] = (500000.0, 4000000.0),
) -> dict[str, Path]:
    """A uint8 RGB scene whose label raster (same grid) holds class values 1..5 in vertical bands."""
    rng = np.random.default_rng(seed)
    width, height = size
    classes = (np.arange(width)[None, :] * 5 // width + 1).repeat(height, axis=0).astype(np.uint8)
    image = np.stack([classes * 40 + rng.integers(1, 20, classes.shape) for _ in range(3)]).astype(np.uint8)
    transform = from_origin(origin[0], origin[1], res, res)
    image_path = write_raster(
        folder / f"{scene_id}.tif", image, crs, transform, nodata=0, descriptions=["red", "green", "blue"]
    )
    label_path = write_raster(folder / f"{scene_id}_labels.tif", classes, crs, transform, nodata=0)
    return {"image": image_path, "labels": label_path}


def write_catalog(folder: Path, rows: list[dict[str, str]], name: str = "catalog.csv") -> Path:
    """Write a catalog CSV; rows hold scene_id, image, labels and optionally split, bands."""
    columns = ["scene_id", "image", "labels", "split", "bands"]
    lines = [",".join(columns)] + [",".join(str(r.get(c, "")) for c in columns) for r in rows]
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


def write_geojson(path: Path, features: list[tuple[dict, object]], crs: str | None = None) -> Path:
    """Write polygons [(geometry, class)] as a FeatureCollection (legacy crs member if given)."""
    doc: dict = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "properties": {"class": cls}, "geometry": geom} for geom, cls in features
        ],
    }
    if crs:
        doc["crs"] = {"type": "name", "properties": {"name": crs}}
    path.write_text(json.dumps(doc))
    return path


def tiny_overrides(tmp_path: Path) -> list[str]:
    """``--set`` overrides that point the project's params at tiny data under tmp_path."""
    return [
        f"data.catalog={tmp_path / 'catalog.csv'}",
        f"data.imagery={tmp_path}",
        "tile.size=16",
        "tile.stride=16",
        "tile.workers=1",
        "tile.max_nodata=0.5",
    ]


def tiny_params(tmp_path: Path, *overrides: str):
    """The project's params.yaml with tiny-data overrides, catalog under tmp_path."""
    return load_params(ROOT / "params.yaml", [*tiny_overrides(tmp_path), *overrides])


def prepare_tiny_pipeline(
    tmp_path: Path,
    *overrides: str,
    splits: tuple[str, ...] = ("train", "train", "val", "test", "test"),
    size: tuple[int, int] | None = None,
):
    """Small scenes (one per entry of ``splits``) ingested, tiled and split; returns (tmp_path, params)."""
    from tilepipe.stages.ingest import ingest
    from tilepipe.stages.split import split
    from tilepipe.stages.tile import tile

    rows = []
    for i, name in enumerate(splits):
        sized = {"size": size} if size else {}
        paths = write_scene(tmp_path, f"s{i}", seed=i, **sized)
        rows.append(
            {"scene_id": f"s{i}", "image": paths["image"].name, "labels": paths["labels"].name, "split": name}
        )
    catalog = write_catalog(tmp_path, rows)
    params = tiny_params(tmp_path, *overrides)
    ingest(params, catalog, tmp_path / "scenes.json")
    tile(params, tmp_path / "scenes.json", tmp_path / "tiles")
    split(params, tmp_path / "scenes.json", tmp_path / "tiles", tmp_path / "split.json")
    return tmp_path, params


@pytest.fixture
def scenes(tmp_path: Path) -> Path:
    """Four small scenes in two UTM zones with a catalog; returns the catalog path."""
    rows = []
    for i in range(4):
        crs = "EPSG:32633" if i % 2 == 0 else "EPSG:32610"
        paths = write_scene(tmp_path, f"s{i}", seed=i, crs=crs)
        rows.append({"scene_id": f"s{i}", "image": paths["image"].name, "labels": paths["labels"].name})
    return write_catalog(tmp_path, rows)


# Pipeline outputs and local state never belong in a copy of the repository's sources.
NOT_SOURCES = (
    "data/",
    "models/",
    "metrics/",
    "predictions/",
    "dvc-remote/",
    "mlflow.db",
    "benchmarks/.work/",
)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread, and do not stall when other jobs load the cores."""
    import torch  # here: most test modules need no torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def copy_repo(dest: Path) -> None:
    """Copy the sources git would see (tracked and untracked, not ignored), minus pipeline outputs."""
    names = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for name in names:
        source = ROOT / name
        if name.startswith(NOT_SOURCES) or not (source.is_file() or source.is_symlink()):
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():  # tilepipe/stages -> ../stages: a link, as git keeps it
            os.symlink(os.readlink(source), dest / name)
        else:
            shutil.copy2(source, dest / name)


# Tiny training params shared by the training, tracking and segmentation tests.
TRAIN = ["train.epochs=3", "train.batch_size=16", "train.width=8", "train.min_purity=0.5", "train.lr=0.01"]


SEG = [  # the U-Net path, as in tests/test_segmentation.py
    "train.task=segmentation",
    "train.model=unet",
    "train.epochs=3",
    "train.batch_size=8",
    "train.width=8",
    "train.lr=0.01",
    "train.early_stopping.metric=val_miou",
]


@pytest.fixture
def prepared(tmp_path):
    return prepare_tiny_pipeline(tmp_path, *TRAIN)
