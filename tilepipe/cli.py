"""The ``tilepipe`` command: one subcommand per stage; dvc.yaml and the flows call the same code."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from tilepipe.cli_args import PATHS
from tilepipe.errors import TilepipeError
from tilepipe.params import Params, load_params
from tilepipe.redaction import redact_text

COMMANDS: dict[str, tuple[str, Callable[[Params, argparse.Namespace], object]]] = {}


def command(name: str, help_text: str):
    """Register a subcommand handler ``fn(params, args)``."""

    def register(fn):
        COMMANDS[name] = (help_text, fn)
        return fn

    return register


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


@command("analyze", "band statistics and class pixel counts of the training scenes' tiles")
def _analyze(params: Params, args: argparse.Namespace) -> None:
    from tilepipe.stages.analyze import analyze

    analyze(params, args.scenes, args.tiles, args.split, args.out)


@command("train", "train a model over every training tile of every training scene")
def _train(params: Params, args: argparse.Namespace) -> None:
    from tilepipe.stages.train import train

    flags = [f"train.nproc_per_node={args.nproc_per_node}"] if args.nproc_per_node is not None else []
    params = _flagged(params, flags, "--nproc-per-node")
    train(params, args.tiles, args.split, args.out, stats_json=args.stats)


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
    one_scene = args.scene is not None or args.probabilities or args.confidence or args.bands or args.aoi
    if args.test_scenes is not None and one_scene:
        raise TilepipeError(
            "predict: --test-scenes DIR takes no SCENE / OUTPUT, --probabilities, --confidence, --bands "
            "or --aoi"
        )
    if args.test_scenes is None and (args.scene is None or args.output is None):
        raise TilepipeError("predict: give SCENE.tif OUT.tif, or --test-scenes DIR for the test scenes")
    # Ask MLflow in a helper process now, while this one imports torch: the two seconds overlap.
    prefetch = Prefetch(model_spec) if is_mlflow_spec(model_spec) else None
    try:
        from tilepipe.stages.predict import predict_held_out, predict_one

        if args.test_scenes is not None:
            predict_held_out(
                params, model_spec, args.scenes, args.split, args.test_scenes, prefetch, args.trust_pickle
            )
        else:
            chosen = {"probabilities": args.probabilities, "bands": args.bands, "prefetch": prefetch}
            chosen |= {"aoi": args.aoi, "confidence": args.confidence, "trust_pickle": args.trust_pickle}
            predict_one(params, model_spec, args.scene, args.output, **chosen)
    finally:
        if prefetch is not None:
            prefetch.close()


@command("map", "map every scene of an archive (catalog, folder or s3:// prefix) exactly once")
def _map(params: Params, args: argparse.Namespace) -> None:
    from tilepipe.tracking.fetch import Prefetch, is_mlflow_spec

    spec = args.model or params.map.model or f"models:/{params.track.model_name}@champion"
    prefetch = Prefetch(spec) if is_mlflow_spec(spec) else None  # MLflow answers while torch imports
    try:
        from tilepipe.mapping.archive import MapOptions
        from tilepipe.stages.map import map_archive

        mp = params.map
        options = MapOptions(args.probabilities or mp.probabilities, args.confidence or mp.confidence,
                             args.engine or mp.engine)  # fmt: skip
        done = map_archive(params, args.catalog, spec, args.out, options, prefetch)
    finally:
        if prefetch is not None:
            prefetch.close()
    if done["failed"]:
        failed, total = done["failed"], done["scenes"]
        raise TilepipeError(f"{failed} of {total} scene(s) failed (see above and summary.csv)")


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


@command("flow", "run the whole pipeline (or `flow study`, `flow cv`, `flow map`) as a Prefect flow")
def _flow(params: Params, args: argparse.Namespace) -> None:
    if args.flow == "study":
        from tilepipe.flows.study import run_study_flow as run
    elif args.flow == "cv":
        from tilepipe.flows.cv import run_cv_flow as run
    elif args.flow == "map":
        from tilepipe.flows.maps import run_map_flow as run
    else:
        from tilepipe.flows.pipeline import run_pipeline as run
    run(args.params, args.overrides)


@command("serve", "serve the Prefect deployments: nightly schedule and on demand")
def _serve(params: Params, args: argparse.Namespace) -> None:
    from tilepipe.flows.deploy import serve

    serve(args.params, args.overrides)


@command("deploy", "register the nightly and on-demand deployments to a process work pool")
def _deploy(params: Params, args: argparse.Namespace) -> None:
    from tilepipe.flows.deploy import deploy

    folder = deploy(args.params, args.overrides, args.pool, args.workdir)
    names = "tilepipe/nightly, tilepipe/on-demand and map-archive/map-nightly"
    print(f"deploy: {names} registered to work pool {args.pool!r}; flow runs work in {folder}")
    print(f"deploy: start a worker with `prefect worker start --pool {args.pool} --limit 1`")


@command("study", "scene-scaling study: held-out score against the number of training scenes")
def _study(params: Params, args: argparse.Namespace) -> None:
    from tilepipe.stages.study import study

    flags = [f"study.sizes={args.sizes}"] if args.sizes else []
    flags += [f"study.repeats={args.repeats}"] if args.repeats is not None else []
    study(_flagged(params, flags, "tilepipe study"), args.tiles, args.split, args.out)


@command("cv", "scene-grouped cross-validation: every labelled scene tested once (metrics/cv.json)")
def _cv(params: Params, args: argparse.Namespace) -> None:
    from tilepipe.stages.cv import cv

    flags = [f"cv.folds={args.folds}"] if args.folds is not None else []
    cv(_flagged(params, flags, "--folds"), args.scenes, args.tiles, args.out, args.metrics)


def _flagged(params: Params, flags: list[str], source: str) -> Params:
    """``params`` with a subcommand's own flags applied as ``--set`` overrides, validated."""
    if not flags:
        return params
    from tilepipe.params import apply_overrides, validate

    return validate(apply_overrides(params.model_dump(mode="json"), flags), source=source)


@command("services", "start (up), stop (down) or show (status) PostgreSQL, S3, MLflow and Prefect servers")
def _services(params: Params | None, args: argparse.Namespace) -> None:
    from tilepipe.services import stack

    if args.action == "up":
        running, started = stack.up(args.dir)
        what = f"started {', '.join(started)}" if started else "already running, nothing started"
        note = f"; {running.note()}" if running.note() else ""
        print(f"# tilepipe services: {what}; logs in {running.home / 'logs'}{note}")
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
            print(f"{name:9} {redact_text(url):45} {state}")


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
        from tilepipe.results import read_json, results_markdown

        print(results_markdown(read_json(args.metrics)), end="")


def _results_table(args: argparse.Namespace) -> None:
    """Print the headline results table, or write it into a README's results block."""
    from tilepipe.fsutil import write_text
    from tilepipe.results import read_json, results_markdown, with_results

    seeds = read_json(args.seeds) if args.seeds.is_file() else None
    cv = read_json(args.cv) if args.cv.is_file() else None
    table = results_markdown(read_json(args.metrics), seeds, cv)
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


NO_PARAMS = {"services"}  # commands that run without a params file
TORCH_COMMANDS = {"train", "evaluate", "predict", "flow", "serve", "study", "cv", "map"}


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
        print(f"tilepipe {args.command}: error: {redact_text(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"tilepipe {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
