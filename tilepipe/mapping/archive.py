"""Mapping an archive exactly once: each scene's map is keyed by what makes it.

The key of a scene's map is the SHA-256 of the scene's fingerprint (``sources.fingerprint``) and
band mapping, the model file's SHA-256 and the params and options that change a map (``predict``,
``--probabilities``, ``--confidence``). Its STAC item records it (``tilepipe:map_key``), so:

* :func:`plan`: a scene whose item holds its key is current and not mapped again; the others are jobs;
* :func:`map_job`: one scene, under its lock, into a temp folder, published whole (``outputs``);
  the CLI runs the jobs in a loop (``stages/map.py``), the ``map-archive`` flow one task each.

A scene that cannot be mapped (unreadable, a band missing) raises a one-line ``TilepipeError``; a
read that failed on the way raises what :func:`is_transient` accepts, and is tried again.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tilepipe.errors import TilepipeError
from tilepipe.fsutil import file_sha256
from tilepipe.geo.raster_io import gdal_env, open_raster
from tilepipe.geo.read_errors import (
    ReadInterrupted,
    StoreUnavailable,
    describe_error,
    is_retryable,
    is_transient_read_error,
)
from tilepipe.geo.remote import is_remote, remote_stat
from tilepipe.geo.scene_row import naming_origin
from tilepipe.mapping.engines import engine_model
from tilepipe.mapping.outputs import LocalStore, S3Store
from tilepipe.mapping.predict import predict_scene
from tilepipe.mapping.records import KEY, archive_item, item_row
from tilepipe.mapping.sources import ArchiveScene, as_row, fingerprint, model_bands
from tilepipe.ml.checkpoint import ModelMeta, load_model
from tilepipe.params import Params
from tilepipe.processes import cores

MAP_VERSION = 1  # bump when the same inputs would give other maps
# A test seam, never set in use: the kill tests name a scene whose mapping then stops for good once its
# files are complete in the temp folder, before they are published, so the kill lands at a known point.
HOLD_MAP = "TILEPIPE_TEST_HOLD_MAP"
ONNX_CACHE = Path(".tilepipe/onnx")  # the model exported for ONNX Runtime, kept for the next run
RETRY_DELAYS_S = (2.0, 4.0, 8.0)  # as the flow's tile tasks: 3 retries of a read that failed on the way


@dataclass(frozen=True)
class MapOptions:
    """What a map holds besides the class band."""

    probabilities: bool = False
    confidence: bool = False
    engine: str = "torch"  # mapping.engines.ENGINES; in the key: another engine remaps


@dataclass(frozen=True)
class ModelRef:
    """A model as every job loads it: an absolute ``model.pt`` path, its SHA-256 and its identity."""

    path: str
    sha256: str
    described: dict[str, Any] = field(default_factory=dict)  # name, version, run_id, source, sha256


@dataclass(frozen=True)
class MapJob:
    """A scene to map, and the key its map will carry."""

    scene: ArchiveScene
    key: str


def params_key(params: Params, options: MapOptions) -> str:
    """The params and options that change a map."""
    record = {"version": MAP_VERSION, "predict": params.predict.model_dump(mode="json"), **vars(options)}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def map_key(scene: ArchiveScene, scene_fingerprint: str, model_sha256: str, params_hash: str) -> str:
    """The key of a scene's map: scene, bands, model, params."""
    record = {"scene": scene_fingerprint, "bands": scene.band_spec(), "model": model_sha256,
              "params": params_hash}  # fmt: skip
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def failed_row(scene: ArchiveScene, problem: str, seconds: float = 0.0) -> dict[str, Any]:
    """A summary row for a scene that could not be mapped: the culprit and the problem."""
    return {"scene_id": scene.scene_id, "status": "failed", "seconds": round(seconds, 3), "problem": problem}


def plan(
    params: Params,
    scenes: list[ArchiveScene],
    store: LocalStore | S3Store,
    model: ModelRef,
    options: MapOptions,
) -> tuple[list[MapJob], list[dict[str, Any]]]:
    """Jobs for the scenes whose map is missing or of another key; a row for each of the others.

    Current scenes get a ``current`` row (their figures from their items), scenes whose fingerprint
    cannot be taken a ``failed`` one. Local files are hashed on every core at once.
    """
    items = store.items()
    pkey = params_key(params, options)

    def keyed(scene: ArchiveScene) -> str | TilepipeError:
        try:
            return map_key(scene, fingerprint(scene), model.sha256, pkey)
        except TilepipeError as exc:
            return exc

    with ThreadPoolExecutor(max(1, cores())) as pool:
        keys = list(pool.map(keyed, scenes))
    jobs, rows = [], []
    for scene, key in zip(scenes, keys, strict=True):
        item = items.get(scene.scene_id)
        if isinstance(key, TilepipeError):
            rows.append(failed_row(scene, str(key)))
        elif item is not None and item["properties"].get(KEY) == key:
            rows.append(item_row(item, "current"))
        else:
            jobs.append(MapJob(scene, key))
    return jobs, rows


_MODELS: dict[tuple[str, str, str], tuple[Any, ModelMeta]] = {}
_MODELS_LOCK = threading.Lock()


def loaded(model: ModelRef, engine: str = "torch") -> tuple[Any, ModelMeta]:
    """The model run by ``engine``, loaded once per process (tasks on one Dask worker share it).

    Its SHA-256 is checked; ONNX Runtime that cannot run it falls back to torch, said in one line.
    """
    with _MODELS_LOCK:
        if (model.path, model.sha256, "torch") not in _MODELS:
            if file_sha256(model.path) != model.sha256:
                raise TilepipeError(f"{model.path}: changed since this run started; run again")
            _MODELS[(model.path, model.sha256, "torch")] = load_model(Path(model.path))
        if (model.path, model.sha256, engine) not in _MODELS:
            net, meta = _MODELS[(model.path, model.sha256, "torch")]
            cache = (ONNX_CACHE.absolute(), model.sha256)
            _MODELS[(model.path, model.sha256, engine)] = (engine_model(net, engine, cache=cache), meta)
        return _MODELS[(model.path, model.sha256, engine)]


def map_job(
    job: MapJob, params: Params, model: ModelRef, store: LocalStore | S3Store, options: MapOptions,
    again: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Map one scene under its lock; its summary row (``mapped``, ``current`` or ``busy``).

    ``again``: a retry after a fault on the way (see :func:`_reconnect`).
    """
    scene, started = job.scene, time.perf_counter()
    with store.lock(scene.scene_id) as held:
        if not held:
            return {"scene_id": scene.scene_id, "status": "busy", "seconds": 0.0,
                    "problem": "being mapped by another run right now"}  # fmt: skip
        item = store.item(scene.scene_id)
        if item is not None and item["properties"].get(KEY) == job.key:
            return item_row(item, "current")  # another run mapped it since the plan
        net, meta = loaded(model, options.engine)
        if again and is_remote(scene.image):
            _reconnect(scene.image, params.tile.gdal_cache_mb)
        with _store_outage(scene), naming_origin(as_row(scene)), store.writing(scene.scene_id) as tmp:
            output = tmp / f"{scene.scene_id}.tif"
            bands = model_bands(scene, params.tile.gdal_cache_mb)
            summary = predict_scene(params, net, meta, scene.image, output, options.probabilities, bands,
                                    confidence=options.confidence, stats=True, quiet=True)  # fmt: skip
            engine = getattr(net, "engine_name", "torch")
            item = archive_item(output, scene, meta, model, job.key, summary["stats"], options, store, engine)
            _hold_for_test(scene.scene_id, tmp)
    return {**item_row(item, "mapped"), "seconds": round(time.perf_counter() - started, 3)}


def _reconnect(uri: Path | str, cache_mb: int) -> None:
    """Open the remote scene once and let a failure go, before a retry.

    After an outage GDAL's first open of the file fails once more (seen with a restarted S3 server:
    the file is taken for one in no known format), the next one works; the map's own open then says
    whatever is still wrong.
    """
    try:
        with gdal_env(cache_mb), open_raster(uri):
            pass
    except TilepipeError:
        pass


@contextmanager
def _store_outage(scene: ArchiveScene) -> Iterator[None]:
    """A remote scene not opened for a fault on the way: StoreUnavailable, which a retry can mend.

    GDAL says so (a curl error, a refused connection), or the store does not answer now.
    """
    try:
        yield
    except TilepipeError as exc:
        if isinstance(exc, ReadInterrupted) or not is_remote(scene.image):
            raise
        if is_transient_read_error(exc):
            raise StoreUnavailable(str(exc)) from None
        try:
            remote_stat(str(scene.image))
        except TilepipeError as down:
            if "does not answer" in str(down):
                raise StoreUnavailable(str(exc)) from None
        raise


def _hold_for_test(scene_id: str, folder: Path) -> None:
    """The kill tests' seam (``HOLD_MAP``): say so in the temp folder, then wait here until killed."""
    if os.environ.get(HOLD_MAP) == scene_id:
        (folder / "held").touch()
        while True:
            threading.Event().wait(0.05)


def is_transient(exc: BaseException) -> bool:
    """True for a failure on the way, which a retry can mend: the flows' one classification."""
    return is_retryable(exc)


def map_with_retries(
    job: MapJob, params: Params, model: ModelRef, store: LocalStore | S3Store, options: MapOptions
) -> dict[str, Any]:
    """:func:`map_job`, a transient failure retried after 2, 4 and 8 s; any failure is a ``failed`` row."""
    started = time.perf_counter()
    for attempt, delay in enumerate((*RETRY_DELAYS_S, None)):
        try:
            return map_job(job, params, model, store, options, again=attempt > 0)
        except Exception as exc:  # noqa: BLE001 - a scene's failure is its row; the others go on
            if delay is None or not is_transient(exc):
                return failed_row(job.scene, describe_error(exc), time.perf_counter() - started)
            problem = describe_error(exc)
            print(f"map: {job.scene.scene_id}: {problem}; trying again in {delay:.0f} s", flush=True)
            time.sleep(delay)
    raise AssertionError("unreachable")


class Progress:
    """Scenes done of total, megapixels per second and the time left, one line per scene."""

    def __init__(self, total: int, say=print) -> None:
        self.total, self.done, self.megapixels, self.say = total, 0, 0.0, say
        self.started = time.perf_counter()

    def update(self, row: dict[str, Any]) -> str:
        """Count a finished scene and print its line."""
        self.done += 1
        self.megapixels += float(row.get("megapixels") or 0) if row["status"] == "mapped" else 0.0
        elapsed = time.perf_counter() - self.started
        rate = self.megapixels / max(elapsed, 1e-9)
        left = elapsed / self.done * (self.total - self.done)
        what = row["status"] + (f": {row['problem']}" if row.get("problem") else "")
        line = (f"map: [{self.done}/{self.total}] {row['scene_id']} {what} ({row.get('seconds', 0):.1f} s); "
                f"{rate:.2f} Mpx/s, ETA {left:.0f} s")  # fmt: skip
        self.say(line)
        return line
