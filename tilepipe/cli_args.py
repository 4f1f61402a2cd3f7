"""The ``tilepipe`` command's arguments: each subcommand's paths and options (tilepipe/cli.py runs them)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from tilepipe import wiring as w
from tilepipe.geo.remote import as_location


def _path_args(sub: argparse.ArgumentParser, **paths: Path) -> None:
    for name, default in paths.items():
        flag = f"--{name.replace('_', '-')}"
        sub.add_argument(flag, type=Path, default=default, help=f"(default: {default})")


def _sizes(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected scene counts like 1,2,4") from None


PATHS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "synthesize": lambda s: _path_args(s, out=w.SYNTHETIC),
    "ingest": lambda s: (
        s.add_argument("--catalog", type=Path, default=None, help="(default: data.catalog in params)"),
        _path_args(s, out=w.SCENES),
    ),
    "tile": lambda s: _path_args(s, scenes=w.SCENES, out=w.TILES),
    "split": lambda s: _path_args(s, scenes=w.SCENES, tiles=w.TILES, out=w.SPLIT),
    "analyze": lambda s: _path_args(s, scenes=w.SCENES, tiles=w.TILES, split=w.SPLIT, out=w.STATS),
    "train": lambda s: (
        _path_args(s, tiles=w.TILES, split=w.SPLIT, out=w.MODELS, stats=w.STATS),
        s.add_argument(
            "--nproc-per-node", type=int, default=None, metavar="N",
            help="train on N processes of this machine, torchrun-style (default: train.nproc_per_node)",
        ),  # fmt: skip
    ),
    "evaluate": lambda s: (
        _path_args(
            s,
            model_dir=w.MODELS,
            tiles=w.TILES,
            split=w.SPLIT,
            out=w.METRICS,
            scenes=w.SCENES,
        ),  # fmt: skip
        s.add_argument(
            "--maps",
            type=Path,
            default=None,
            help="also score the full-scene maps in this folder (from `tilepipe predict --test-scenes`)",
        ),  # fmt: skip
        s.add_argument("--no-register", action="store_true", help="do not register the model"),
    ),
    "predict": lambda s: (
        s.add_argument("scene", type=as_location, nargs="?", help="the scene to map: a GeoTIFF, s3:// or https://"),
        s.add_argument("output", type=Path, nargs="?", help="output GeoTIFF (COG)"),
        s.add_argument(
            "--test-scenes",
            type=Path,
            default=None,
            metavar="DIR",
            help="instead of one scene, map every held-out test scene of --split into DIR/<scene_id>.tif",
        ),  # fmt: skip
        _path_args(s, scenes=w.SCENES, split=w.SPLIT),
        s.add_argument(
            "--model",
            default=None,
            help="models:/NAME@ALIAS, an MLflow run id, or a model.pt path "
            "(default: models:/<track.model_name>@champion)",
        ),
        s.add_argument("--probabilities", action="store_true", help="add per-class probability bands"),
        s.add_argument(
            "--aoi", type=Path, default=None, help="area of interest (GeoJSON or vector file): nodata outside"
        ),
        s.add_argument(
            "--confidence",
            action="store_true",
            help="add a band of the top class's calibrated probability (x 255) to mask uncertain pixels",
        ),
        s.add_argument(
            "--trust-pickle",
            action="store_true",
            help="load a run that has no weights/model.pt from its pickled MLflow model (unpickling runs "
            "code from the tracking server: only for a server you trust)",
        ),
        s.add_argument(
            "--bands",
            default=None,
            help="band mapping if the bands carry no names, e.g. red=3;green=2;blue=1",
        ),
    ),
    "map": lambda s: (
        s.add_argument("catalog", type=as_location, nargs="?", default=None,
                       help="CSV or STAC catalog, folder or s3://bucket/prefix/ of GeoTIFFs "
                       "(default: map.catalog, else data.catalog)"),
        s.add_argument("--model", default=None, help="model.pt, a models folder, models:/NAME@ALIAS or "
                       "runs:/... (default: map.model, else models:/<track.model_name>@champion)"),
        s.add_argument("--out", type=as_location, default=None, metavar="DIR",
                       help="a folder or s3://bucket/prefix/ (default: map.out)"),
        s.add_argument("--probabilities", action="store_true", help="add a probability band per class"),
        s.add_argument("--confidence", action="store_true", help="add the top class's probability as band 2"),
        s.add_argument("--engine", choices=("onnxruntime", "torch"), default=None,
                       help="inference engine (default: map.engine); torch: the reference and fallback"),
    ),  # fmt: skip
    "report": lambda s: (
        _path_args(s, split=w.SPLIT, metrics=w.METRICS / "metrics.json", seeds=w.METRICS / "seeds.json",
                   cv=w.METRICS / "cv.json"),
        s.add_argument("--markdown", action="store_true", help="print the headline results table (Markdown)"),
        s.add_argument("--readme", type=Path, default=None, help="write that table into this README's block"),
    ),
    "study": lambda s: (
        _path_args(s, tiles=w.TILES, split=w.SPLIT, out=w.STUDY),
        s.add_argument("--sizes", type=_sizes, default=None, help="training-scene counts, e.g. 1,2,4,6"),
        s.add_argument("--repeats", type=int, default=None, help="seeded repeats (default: study.repeats)"),
    ),
    "cv": lambda s: (
        _path_args(s, scenes=w.SCENES, tiles=w.TILES, out=w.CV, metrics=w.CV_METRICS),
        s.add_argument("--folds", type=int, default=None, metavar="K", help="folds (default: cv.folds)"),
    ),
    "catalog": lambda s: (
        s.add_argument("catalog", type=Path, help="the catalog: a CSV, or a STAC catalog, collection or item "
                       "collection (JSON)"),
        s.add_argument("--to-csv", type=Path, default=None, metavar="OUT.csv",
                       help="also write the equivalent CSV catalog (paths relative to it)"),
        s.add_argument(
            "--params",
            nargs="?",
            type=Path,
            default=None,
            const=Path("params.yaml"),
            metavar="FILE",
            help="also print data: and bands: sections for FILE (default: params.yaml) that fit the catalog",
        ),  # fmt: skip
        s.add_argument("--write", action="store_true", help="merge those sections into the params file"),
    ),
    "deploy": lambda s: (
        s.add_argument(
            "--pool", default="tilepipe", help="process work pool, created if missing (default: tilepipe)"
        ),
        s.add_argument(
            "--workdir",
            type=Path,
            default=None,
            help="the project folder the flow runs work in on the workers' machines (default: this one)",
        ),  # fmt: skip
    ),
    "services": lambda s: (
        s.add_argument("action", choices=["up", "down", "status"], help="start, stop or show the stack"),
        s.add_argument("--dir", type=Path, default=Path(".services"), help="its folder (default: .services)"),
    ),
    "flow": lambda s: s.add_argument(
        "flow", nargs="?", choices=["pipeline", "study", "cv", "map"], default="pipeline",
        help="(default: pipeline; map: the map-archive flow on map.* of params)",
    ),
}
