"""The pipeline as a Prefect flow: the stage functions and paths of dvc.yaml, one task per step."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from prefect import State, Task, flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.settings import PREFECT_API_URL
from prefect.tasks import exponential_backoff
from rasterio.errors import RasterioError

from tilepipe.errors import TilepipeError
from tilepipe.flows import dvc_cli
from tilepipe.flows.dask_runner import api_for_workers, check_scheduler, for_workers, task_runner
from tilepipe.flows.fanout import run_each
from tilepipe.flows.repo_lock import pipeline_lock
from tilepipe.flows.report import publish_metrics
from tilepipe.flows.settings import check_api, prefect_settings
from tilepipe.fsutil import remove_leftovers
from tilepipe.geo.read_errors import is_transient_read_error
from tilepipe.geo.scenes import SceneRecord
from tilepipe.params import Params, load_params
from tilepipe.stages.analyze import analyze
from tilepipe.stages.evaluate import evaluate, register
from tilepipe.stages.ingest import ingest
from tilepipe.stages.predict import predict_held_out
from tilepipe.stages.split import split
from tilepipe.stages.synthesize import synthesize
from tilepipe.stages.tile import plan_tiling, summarize_tiles, tile_one
from tilepipe.stages.train import train
from tilepipe.wiring import METRICS, MODELS, PREDICTIONS, SCENES, SPLIT, STATS, SYNTHETIC, TILES

BACKOFF = exponential_backoff(backoff_factor=2)  # 2, 4, 8 s between the 3 retries of a tile task
step = partial(task, cache_policy=NO_CACHE)  # no result caching: tiling is incremental by fingerprint


def is_transient(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry condition: faults on the way (OSError, a remote read GDAL could not finish), never bad data.

    A file whose pixels do not decode fails the same way every time: tiling reports it as a
    TilepipeError naming the file and the pixels, and so does any other bad input.
    """
    try:
        state.result()
    except TilepipeError:
        return False
    except OSError:
        return True
    except RasterioError as exc:
        return is_transient_read_error(exc)
    except Exception:  # noqa: BLE001 - anything else is a bug, and a retry would only repeat it
        return False
    return False


@step(name="synthesize")
def synthesize_task(params: Params) -> Path:
    """Write the built-in synthetic scenes and their catalog to data/synthetic."""
    synthesize(params.synthesize, SYNTHETIC)
    return SYNTHETIC


@step(name="ingest")
def ingest_task(params: Params, catalog: Path) -> Path:
    """Validate the catalog's scenes into data/ingest/scenes.json."""
    ingest(params, catalog, SCENES)
    return SCENES


@step(name="plan-tiles")
def plan_task(params: Params, scenes_json: Path) -> list[SceneRecord]:
    """Drop tiles of scenes gone from the catalog; return the scenes whose tiles are missing or stale."""
    return plan_tiling(params, scenes_json, TILES)


@step(name="tile", retries=3, retry_delay_seconds=BACKOFF, retry_condition_fn=is_transient)
def tile_task(scene: SceneRecord, params: Params, out_dir: Path = TILES) -> Path:
    """Tile one scene into data/tiles/<scene_id> (``out_dir``: that folder as a Dask worker sees it)."""
    tile_one(scene, params, out_dir)
    return TILES / scene.scene_id


@step(name="summarize-tiles")
def summary_task(scenes_json: Path, tiled: list[Path]) -> Path:
    """Write data/tiles/summary.json once every scene is tiled; drop what a killed worker left."""
    remove_leftovers(TILES)  # every tile task is over: a temp folder now is a dead worker's
    summarize_tiles(scenes_json, TILES)
    return TILES


@step(name="split")
def split_task(params: Params, scenes_json: Path, tiles: Path) -> Path:
    """Assign whole scenes to train / val / test in data/split/split.json."""
    split(params, scenes_json, tiles, SPLIT)
    return SPLIT


@step(name="analyze")
def analyze_task(params: Params, scenes_json: Path, tiles: Path, split_json: Path) -> Path:
    """Band statistics and class pixel counts of the training tiles into data/stats/stats.json."""
    analyze(params, scenes_json, tiles, split_json, STATS)
    return STATS


@step(name="train")
def train_task(params: Params, tiles: Path, split_json: Path, stats_json: Path) -> Path:
    """Train in an MLflow run into models/, each epoch also logged to the Prefect logs."""
    train(params, tiles, split_json, MODELS, on_epoch=log_epoch, stats_json=stats_json)
    return MODELS


@step(name="predict")
def predict_task(params: Params, model_dir: Path, scenes_json: Path, split_json: Path) -> Path:
    """Map the held-out test scenes to COGs in predictions/."""
    predict_held_out(params, model_dir / "model.pt", scenes_json, split_json, PREDICTIONS)
    return PREDICTIONS


@step(name="evaluate")
def evaluate_task(params: Params, model_dir: Path, tiles: Path, split_json: Path, maps: Path) -> Path:
    """Score the model on the test scenes (tiles and maps) into metrics/ and log them to the MLflow run."""
    evaluate(params, model_dir, tiles, split_json, METRICS, maps, SCENES)
    return METRICS


@step(name="register")
def register_task(params: Params, model_dir: Path, metrics_dir: Path, split_json: Path) -> dict[str, Any]:
    """Register the model in MLflow; it becomes champion only if it beats the champion."""
    return register(params, model_dir, metrics_dir, split_json)


@step(name="dvc-commit")
def dvc_commit_task(stages: list[str]) -> str:
    """Record the outputs of the stages this run wrote in dvc.lock."""
    return dvc_cli.commit(stages)


def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
    """``on_epoch`` callback of training: one line per epoch in the Prefect logs."""
    get_run_logger().info(
        "epoch %d: val_macro_f1 %.3f, val_accuracy %.3f, val_loss %.4f, train_loss %.4f, %.1f s, %.0f tile/s",
        epoch, metrics["val_macro_f1"], metrics["val_accuracy"], metrics["val_loss"], metrics["train_loss"],
        metrics["epoch_seconds"], metrics["tiles_per_second"],
    )  # fmt: skip


def needs_synthesis(params: Params) -> bool:
    """True for the built-in catalog (data/synthetic, as in dvc.yaml) unless DVC says it is current."""
    builtin = params.data.catalog.resolve().parent == SYNTHETIC.resolve()
    return builtin and not dvc_cli.synthesis_is_current(params)


def tile_all(params: Params, todo: list[SceneRecord]) -> list[Path]:
    """One tile task per scene, at most ``tile.workers`` at a time; raises if any scene failed.

    The tasks run in a thread pool here or on a Dask cluster (``orchestrate``): the same shards.
    """
    if not todo:
        return []
    out_dir = TILES if params.orchestrate.runner == "threads" else TILES.resolve()
    calls = [
        (f"tile-{s.scene_id}", {"scene": for_workers(params, s), "params": params, "out_dir": out_dir})
        for s in todo
    ]
    check_scheduler(params)
    with api_for_workers(params):
        return run_each(tile_task, calls, params.tile.workers, task_runner(params))


@flow(name="tilepipe", log_prints=True)
def pipeline(params_path: str = "params.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """Run synthesize (built-in data), ingest, tile, split, analyze, train, predict, evaluate, register."""
    with pipeline_lock():  # one run per repository: DVC's repo lock, which `dvc repro` takes too
        return _pipeline(params_path, overrides)


def _pipeline(params_path: str, overrides: list[str] | None) -> dict[str, Any]:
    """The flow's body, run while the repository's lock is held."""
    params = load_params(params_path, overrides)  # bad values fail the run at once, naming the key
    log, ran = get_run_logger(), ["ingest", "tile", "split", "analyze", "train", "predict", "evaluate"]
    if needs_synthesis(params):
        synthesize_task(params)
        ran.insert(0, "synthesize")
    scenes = ingest_task(params, params.data.catalog)
    todo = plan_task(params, scenes)
    log.info("tile: %d scene(s) to tile: %s", len(todo), " ".join(s.scene_id for s in todo) or "none")
    tiles = summary_task(scenes, tile_all(params, todo))
    split_json = split_task(params, scenes, tiles)
    stats_json = analyze_task(params, scenes, tiles, split_json)
    model_dir = train_task(params, tiles, split_json, stats_json)
    maps = predict_task(params, model_dir, scenes, split_json)
    metrics_dir = evaluate_task(params, model_dir, tiles, split_json, maps)
    registered = register_task(params, model_dir, metrics_dir, split_json)
    summary = publish_metrics(model_dir, metrics_dir, registered)
    if reason := dvc_cli.why_not_commit(params):
        (log.warning if dvc_cli.is_repo() else log.info)("dvc.lock not updated: %s", reason)
    else:
        dvc_commit_task(ran)
    return {**summary, "tiled": [s.scene_id for s in todo]}


def run_pipeline(params_path: Path | str = "params.yaml", overrides: list[str] | None = None) -> dict:
    """Run the pipeline flow once in this process (``tilepipe flow``)."""
    with pipeline_lock(), prefect_settings():  # a second run fails here, before Prefect starts
        if PREFECT_API_URL.value():
            check_api()  # a server that does not answer: one clear line, not Prefect's traceback
        return pipeline(str(params_path), list(overrides or []))
