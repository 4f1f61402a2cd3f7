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

from tilepipe.flows import dvc_cli
from tilepipe.flows.dask_runner import api_for_workers, check_scheduler, for_workers, task_runner
from tilepipe.flows.fanout import run_each
from tilepipe.flows.repo_lock import pipeline_lock
from tilepipe.flows.report import publish_metrics
from tilepipe.flows.settings import check_api, prefect_settings
from tilepipe.flows.stage_gate import StageGate
from tilepipe.fsutil import remove_leftovers
from tilepipe.geo.read_errors import RETRIED, failure_kind
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
    """Retry condition: only what a retry can fix (``tilepipe.geo.read_errors.failure_kind``).

    Retried: a store that does not answer, a connection refused or reset, a timeout, HTTP 429 or
    5xx, an I/O error. Not retried: bad input (params, catalog, damaged pixels), permission
    denied, a read-only folder, a missing file, a full disk, and bugs: they fail the same way again.
    """
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - classified, not handled
        kind = failure_kind(exc)
        retry = kind in RETRIED
        get_run_logger().info("%s: %s (%s), %s", task_run.name, kind, type(exc).__name__,
                              "retried" if retry else "not retried: a retry cannot help")  # fmt: skip
        return retry
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


def needs_synthesis(params: Params, gate: StageGate) -> bool:
    """True for the built-in catalog (data/synthetic, as in dvc.yaml) unless DVC says it is current."""
    if params.data.catalog.resolve().parent != SYNTHETIC.resolve():
        return False
    return gate.must_run("synthesize") if gate.on else not dvc_cli.synthesis_is_current(params)


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
    """Run synthesize (built-in data), ingest, tile, split, analyze, train, predict, evaluate, register.

    In a DVC project with params.yaml's params, a stage whose deps, params and outs DVC reports
    unchanged is skipped (``flows/stage_gate.py``); a model is registered only when evaluated anew.
    """
    with pipeline_lock():  # one run per repository: DVC's repo lock, which `dvc repro` takes too
        return _pipeline(params_path, overrides)


def _pipeline(params_path: str, overrides: list[str] | None) -> dict[str, Any]:
    """The flow's body, run while the repository's lock is held: each stage DVC says changed."""
    params = load_params(params_path, overrides)  # bad values fail the run at once, naming the key
    gate = StageGate.start(params)
    tiled = _prepare(params, gate)
    summary = _model(params, gate)
    if not gate.on:
        (get_run_logger().warning if dvc_cli.is_repo() else get_run_logger().info)(
            "dvc.lock not updated: %s", gate.off
        )
    return {**summary, "tiled": tiled, "ran": gate.ran, "skipped": gate.skipped}


def _prepare(params: Params, gate: StageGate) -> list[str]:
    """Run synthesize (built-in data), ingest, tile and split as DVC decides; the scene ids tiled."""
    if needs_synthesis(params, gate):
        synthesize_task(params)
        _done(gate, "synthesize")
    if gate.must_run("ingest"):
        ingest_task(params, params.data.catalog)
        _done(gate, "ingest")
    todo: list[SceneRecord] = []
    if gate.must_run("tile"):
        todo = plan_task(params, SCENES)
        get_run_logger().info(
            "tile: %d scene(s) to tile: %s", len(todo), " ".join(s.scene_id for s in todo) or "none"
        )
        summary_task(SCENES, tile_all(params, todo))
        _done(gate, "tile")
    if gate.must_run("split"):
        split_task(params, SCENES, TILES)
        _done(gate, "split")
    return [s.scene_id for s in todo]


def _model(params: Params, gate: StageGate) -> dict[str, Any]:
    """Run analyze, train, predict and evaluate as DVC decides; a model is registered once, once evaluated."""
    if gate.must_run("analyze"):
        analyze_task(params, SCENES, TILES, SPLIT)
        _done(gate, "analyze")
    if gate.must_run("train"):
        train_task(params, TILES, SPLIT, STATS)
        _done(gate, "train")
    if gate.must_run("predict"):
        predict_task(params, MODELS, SCENES, SPLIT)
        _done(gate, "predict")
    if not gate.must_run("evaluate"):
        get_run_logger().info("register: no new evaluation, nothing registered")
        return {"model_version": None}
    evaluate_task(params, MODELS, TILES, SPLIT, PREDICTIONS)
    summary: dict[str, Any] = {"model_version": None}
    run_file = MODELS / "run.json"  # not a DVC out: a model pulled with dvc has none
    if run_file.is_file():
        registered = register_task(params, MODELS, METRICS, SPLIT)  # registered before: no new version
        summary = publish_metrics(MODELS, METRICS, registered)
    else:
        get_run_logger().warning("register: %s not found (no MLflow run): nothing registered", run_file)
    _done(gate, "evaluate")  # recorded after registering: a run killed in between registers on resume
    return summary


def _done(gate: StageGate, stage: str) -> None:
    """``stage`` ran: record it in dvc.lock now when DVC decides, as ``dvc repro`` does."""
    gate.done(stage)
    if gate.on:
        dvc_commit_task([stage])


def run_pipeline(params_path: Path | str = "params.yaml", overrides: list[str] | None = None) -> dict:
    """Run the pipeline flow once in this process (``tilepipe flow``)."""
    with pipeline_lock(), prefect_settings():  # a second run fails here, before Prefect starts
        if PREFECT_API_URL.value():
            check_api()  # a server that does not answer: one clear line, not Prefect's traceback
        return pipeline(str(params_path), list(overrides or []))
