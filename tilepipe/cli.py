"""The ``tilepipe`` command: one subcommand per stage; dvc.yaml and the flows call the same code."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from tilepipe import wiring as w
from tilepipe.errors import TilepipeError
from tilepipe.geo.remote import as_location
from tilepipe.params import Params, load_params

COMMANDS: dict[str, tuple[str, Callable[[Params, argparse.Namespace], object]]] = {}


def command(name: str, help_text: str):
    """Register a subcommand handler ``fn(params, args)``."""

    def register(fn):
        COMMANDS[name] = (help_text, fn)
        return fn

    return register


def _path_args(sub: argparse.ArgumentParser, **paths: Path) -> None:
    for name, default in paths.items():
        flag = f"--{name.replace('_', '-')}"
        sub.add_argument(flag, type=Path, default=default, help=f"(default: {default})")


@command("synthesize", "write the built-in synthetic scene collection and its catalog")
def _synthesize(params: Params, args: argparse.Namespace) -> None:
    from tilepipe.stages.synthesize import synthesize

    synthesize(params.synthesize, args.out)


@command("ingest", "validate the catalog's scenes and record per-scene metadata")
def _ingest(params: Params, args: argparse.Namespace) -> None:
    from tilepipe.stages.ingest import ingest

    ingest(params, args.catalog or params.data.catalog, args.out)


@command("tile", "cut scenes into tiles with windowed reads (incremental)")
def _tile(params: Params, args: argparse.Namespace) -> None:
    from tilepipe.stages.tile import tile

    tile(params, args.scenes, args.out)


@command("split", "assign whole scenes to train / val / test")
def _split(params: Params, args: argparse.Namespace) -> None:
    from tilepipe.stages.split import split

    split(params, args.scenes, args.tiles, args.out)


@command("train", "train a model over every training tile of every training scene")
def _train(params: Params, args: argparse.Namespace) -> None:
    from tilepipe.stages.train import train

    if args.nproc_per_node is not None:
        from tilepipe.params import apply_overrides, validate

        flag = [f"train.nproc_per_node={args.nproc_per_node}"]
        params = validate(apply_overrides(params.model_dump(mode="json"), flag), source="--nproc-per-node")
    train(params, args.tiles, args.split, args.out)


@command("evaluate", "score the model on the held-out test scenes, log it and register it")
def _evaluate(params: Params, args: argparse.Namespace) -> None:
    from tilepipe.stages.evaluate import evaluate, register

    evaluate(params, args.model_dir, args.tiles, args.split, args.out, args.maps, args.scenes)
    if not args.no_register and (args.model_dir / "run.json").is_file():
        register(params, args.model_dir, args.out, args.split)


@command("predict", "predict a whole scene to a georeferenced map (COG)")
def _predict(params: Params, args: argparse.Namespace) -> None:
    from tilepipe.tracking.fetch import Prefetch, is_mlflow_spec

    model_spec = args.model or f"models:/{params.track.model_name}@champion"
    if args.test_scenes is not None and (args.scene is not None or args.probabilities or args.bands):
        raise TilepipeError("predict: --test-scenes DIR takes no SCENE / OUTPUT, --probabilities or --bands")
    if args.test_scenes is None and (args.scene is None or args.output is None):
        raise TilepipeError("predict: give SCENE.tif OUT.tif, or --test-scenes DIR for the test scenes")
    # Ask MLflow in a helper process now, while this one imports torch: the two seconds overlap.
    prefetch = Prefetch(model_spec) if is_mlflow_spec(model_spec) else None
    try:
        from tilepipe.stages.predict import predict_held_out, predict_one

        if args.test_scenes is not None:
            predict_held_out(params, model_spec, args.scenes, args.split, args.test_scenes, prefetch)
        else:
            predict_one(params, model_spec, args.scene, args.output, args.probabilities, args.bands, prefetch)
    finally:
        if prefetch is not None:
            prefetch.close()


@command("catalog", "check a CSV or STAC catalog's scenes without tiling; --params proposes data: and bands:")
def _catalog(params: Params, args: argparse.Namespace) -> None:
    import yaml

    from tilepipe.geo.survey import (
        merged_params,
        proposed_params,
        scene_line,
        survey_catalog,
        write_csv,
        write_sections,
    )
    from tilepipe.params import read_raw, validate

    found = survey_catalog(args.catalog, params.data.stac.image_asset, params.data.stac.labels_asset)
    scenes = [survey for _, survey in found]
    for scene in scenes:
        print(scene_line(scene))
    if args.to_csv is not None:
        write_csv(found, args.to_csv)
        print(f"catalog: wrote {args.to_csv} ({len(found)} scenes)")
    if args.params is None and not args.write:
        return
    proposal = proposed_params(args.catalog, scenes)
    target = args.params or Path("params.yaml")
    if not args.write:
        print(f"# for {target}: data: and bands: sections that fit {args.catalog}")
        print(yaml.safe_dump(proposal, sort_keys=False, default_flow_style=None, width=100), end="")
        return
    merged = merged_params(read_raw(target), proposal)
    validate(merged, source=f"{target} (with the sections proposed for {args.catalog})")
    write_sections(target, merged)
    classes = len(proposal["data"]["classes"])
    print(f"catalog: wrote the data: and bands: sections of {target} ({classes} classes)")


@command("flow", "run the whole pipeline (or `flow study`: the scene-scaling study) as a Prefect flow")
def _flow(params: Params, args: argparse.Namespace) -> None:
    if args.flow == "study":
        from tilepipe.flows.study import run_study_flow

        run_study_flow(args.params, args.overrides)
        return
    from tilepipe.flows.pipeline import run_pipeline

    run_pipeline(args.params, args.overrides)


@command("serve", "serve the Prefect deployments: nightly schedule and on demand")
def _serve(params: Params, args: argparse.Namespace) -> None:
    from tilepipe.flows.deploy import serve

    serve(args.params, args.overrides)


@command("deploy", "register the nightly and on-demand deployments to a process work pool")
def _deploy(params: Params, args: argparse.Namespace) -> None:
    from tilepipe.flows.deploy import deploy

    folder = deploy(args.params, args.overrides, args.pool, args.workdir)
    names = "tilepipe/nightly and tilepipe/on-demand"
    print(f"deploy: {names} registered to work pool {args.pool!r}; flow runs work in {folder}")
    print(f"deploy: start a worker with `prefect worker start --pool {args.pool} --limit 1`")


@command("study", "scene-scaling study: held-out score against the number of training scenes")
def _study(params: Params, args: argparse.Namespace) -> None:
    from tilepipe.params import apply_overrides, validate
    from tilepipe.stages.study import study

    flags = [f"study.sizes={args.sizes}"] if args.sizes else []
    flags += [f"study.repeats={args.repeats}"] if args.repeats is not None else []
    if flags:
        params = validate(apply_overrides(params.model_dump(mode="json"), flags), source="tilepipe study")
    study(params, args.tiles, args.split, args.out)


@command("services", "start (up), stop (down) or show (status) PostgreSQL, S3, MLflow and Prefect servers")
def _services(params: Params | None, args: argparse.Namespace) -> None:
    from tilepipe.services import stack

    if args.action == "up":
        running, started = stack.up(args.dir)
        what = f"started {', '.join(started)}" if started else "already running, nothing started"
        print(f"# tilepipe services: {what}; logs in {running.home / 'logs'}")
        print(running.exports(), end="")
    elif args.action == "down":
        stopped = stack.down(args.dir)
        done = f"stopped {', '.join(stopped)}" if stopped else f"none running in {args.dir}"
        print(f"services: {done}")
    else:
        rows = stack.status(args.dir)
        if not rows:
            print(f"services: no stack in {args.dir} (run `tilepipe services up`)")
        for name, url, state in rows:
            print(f"{name:9} {url:45} {state}")


def _sizes(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected scene counts like 1,2,4") from None


@command("report", "print a summary of the pipeline's outputs (or, --markdown, the results table)")
def _report(params: Params, args: argparse.Namespace) -> None:
    from tilepipe.tiles.splitting import print_summary

    if args.markdown or args.readme:
        _results_table(args)
        return
    if not args.split.is_file():
        raise TilepipeError(f"{args.split}: not found; run `dvc repro` first")
    print_summary(json.loads(args.split.read_text()), params.data.class_names)
    if args.metrics.is_file():
        metrics = json.loads(args.metrics.read_text())
        print(
            "test metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        )


def _results_table(args: argparse.Namespace) -> None:
    """Print the headline results table, or write it into a README's results block."""
    from tilepipe.fsutil import write_text
    from tilepipe.results import read_json, results_markdown, with_results

    seeds = read_json(args.seeds) if args.seeds.is_file() else None
    table = results_markdown(read_json(args.metrics), seeds)
    if args.readme is None:
        print(table, end="")
        return
    if not args.readme.is_file():
        raise TilepipeError(f"{args.readme}: not found")
    write_text(args.readme, with_results(args.readme.read_text(), table, args.readme))
    print(f"report: results table written into {args.readme}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="tilepipe", description=__doc__)
    subs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, _) in COMMANDS.items():
        sub = subs.add_parser(name, help=help_text, description=help_text)
        if name in NO_PARAMS:
            PATHS[name](sub)
            continue
        if name != "catalog":  # there, --params [FILE] also asks for the proposed sections
            sub.add_argument(
                "--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)"
            )
        sub.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a param, e.g. --set tile.size=128 (repeatable; the syntax of dvc exp run -S)",
        )
        PATHS.get(name, lambda s: None)(sub)
    return parser


PATHS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "synthesize": lambda s: _path_args(s, out=w.SYNTHETIC),
    "ingest": lambda s: (
        s.add_argument("--catalog", type=Path, default=None, help="(default: data.catalog in params)"),
        _path_args(s, out=w.SCENES),
    ),
    "tile": lambda s: _path_args(s, scenes=w.SCENES, out=w.TILES),
    "split": lambda s: _path_args(s, scenes=w.SCENES, tiles=w.TILES, out=w.SPLIT),
    "train": lambda s: (
        _path_args(s, tiles=w.TILES, split=w.SPLIT, out=w.MODELS),
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
            "--bands",
            default=None,
            help="band mapping if the bands carry no names, e.g. red=3;green=2;blue=1",
        ),
    ),
    "report": lambda s: (
        _path_args(s, split=w.SPLIT, metrics=w.METRICS / "metrics.json", seeds=w.METRICS / "seeds.json"),
        s.add_argument("--markdown", action="store_true", help="print the headline results table (Markdown)"),
        s.add_argument("--readme", type=Path, default=None, help="write that table into this README's block"),
    ),
    "study": lambda s: (
        _path_args(s, tiles=w.TILES, split=w.SPLIT, out=w.STUDY),
        s.add_argument("--sizes", type=_sizes, default=None, help="training-scene counts, e.g. 1,2,4,6"),
        s.add_argument("--repeats", type=int, default=None, help="seeded repeats (default: study.repeats)"),
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
        "flow", nargs="?", choices=["pipeline", "study"], default="pipeline", help="(default: pipeline)"
    ),
}


NO_PARAMS = {"services"}  # commands that run without a params file
TORCH_COMMANDS = {"train", "evaluate", "predict", "flow", "serve", "study"}


def configure_process(params: Params, command_name: str) -> None:
    """Process-wide settings, set once at the entry point: torch threads for commands that train."""
    if params.train.threads and command_name in TORCH_COMMANDS:
        import torch

        torch.set_num_threads(params.train.threads)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tilepipe`` console script."""
    args = build_parser().parse_args(argv)
    # Problems with inputs are reported as one clear line each; library warnings would bury them.
    warnings.filterwarnings("ignore", module="rasterio")
    warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")
    try:
        params = None
        if args.command not in NO_PARAMS:
            params = load_params(args.params or Path("params.yaml"), args.overrides)
        if params is not None:
            configure_process(params, args.command)
        COMMANDS[args.command][1](params, args)
    except TilepipeError as exc:
        print(f"tilepipe {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"tilepipe {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
