"""Map stage: every scene of an archive to a COG and its STAC item, exactly once (not a DVC stage).

``tilepipe map CATALOG --model SPEC --out DIR`` runs :func:`map_archive`; the ``map-archive`` flow
runs the same steps (:func:`prepare`, ``archive.map_job`` per scene, :func:`finish`) as Prefect tasks.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tilepipe.errors import TilepipeError
from tilepipe.geo.remote import is_remote, shown
from tilepipe.mapping.archive import MapJob, MapOptions, ModelRef, Progress, loaded, map_with_retries, plan
from tilepipe.mapping.collection import SUMMARY_FILE, summary_csv, totals, update_collection
from tilepipe.mapping.outputs import LocalStore, S3Store, open_store
from tilepipe.mapping.sources import list_scenes
from tilepipe.params import Params
from tilepipe.tracking.fetch import Prefetch
from tilepipe.tracking.maps import log_map_run, map_metrics, store_configured
from tilepipe.tracking.models import model_file

MODEL_CACHE = Path(".tilepipe/models")  # an MLflow model's weights, as a file every worker can load
IDS_SHOWN = 12  # scene ids named per status in the summary line


def where(
    catalog: str | Path | None, out: str | Path | None, params: Params
) -> tuple[str | Path, str | Path]:
    """The catalog (``map.catalog``, else ``data.catalog``) and the output (``map.out``) to use."""
    catalog = catalog or params.map.catalog or params.data.catalog
    out = out or params.map.out
    if is_remote(out) and not str(out).startswith("s3://"):
        raise TilepipeError(f"--out {shown(out)}: maps go to a local folder or an s3://bucket/prefix/")
    return catalog, (str(out) if is_remote(out) else Path(out).absolute())


def prepare(
    params: Params, catalog: str | Path, model_spec: str, out: str | Path, options: MapOptions,
    prefetch: Prefetch | None = None,
) -> tuple[list[MapJob], list[dict[str, Any]], ModelRef]:  # fmt: skip
    """Resolve the model, list the archive, plan: the jobs, the rows of the scenes not to map, the model."""
    path, described = model_file(model_spec, MODEL_CACHE.absolute(), prefetch)
    model = ModelRef(str(path), described["sha256"], described)
    store = open_store(out)
    scenes = list_scenes(catalog, params.data.stac, out)
    jobs, rows = plan(params, scenes, store, model, options)
    current = sum(r["status"] == "current" for r in rows)
    unreadable, sha = len(rows) - current, described["sha256"][:12]
    print(f"map: {len(scenes)} scene(s) in {shown(catalog)}: {len(jobs)} to map, {current} current, "
          f"{unreadable} unreadable; model {sha}, maps in {shown(out)}")  # fmt: skip
    return jobs, rows, model


def finish(
    params: Params, store: LocalStore | S3Store, rows: list[dict[str, Any]], model: ModelRef,
    catalog: str | Path, seconds: float,
) -> dict[str, Any]:  # fmt: skip
    """Write ``collection.json`` and ``summary.csv``, log the MLflow run, print the summary line."""
    _, meta = loaded(model)
    classes = list(meta.classes)
    lock_name = ".collection"  # not a scene id: those never start with "."
    with store.lock(lock_name, wait_s=300) as held:
        if not held:
            raise TilepipeError(f"{shown(store.location)}: another run has held the collection for 5 minutes")
        collection = update_collection(store, store.items(), meta, model.described)
    summary = summary_csv(rows, classes)
    store.write_text(SUMMARY_FILE, summary, "text/csv")
    counts = totals(rows)
    for row in rows:
        if row["status"] == "failed":
            print(f"map: failed {row['scene_id']}: {row['problem']}")
    run_id = _log_run(params, model, rows, classes, seconds, catalog, store, {SUMMARY_FILE: summary})
    print(summary_line(rows, counts, seconds, store.location))
    return {
        **counts,
        "scenes": len(rows),
        "rows": rows,
        "items": len(collection["links"]) - 1,
        "run_id": run_id,
    }


def summary_line(rows: list[dict[str, Any]], counts: dict[str, int], seconds: float, out: str) -> str:
    """One line: how many scenes ended how, naming them (the first few of each status)."""
    parts = []
    for status in ("mapped", "current", "failed", "busy"):
        ids = sorted(r["scene_id"] for r in rows if r["status"] == status)
        if ids:
            more = f" and {len(ids) - IDS_SHOWN} more" if len(ids) > IDS_SHOWN else ""
            parts.append(f"{len(ids)} {status} ({' '.join(ids[:IDS_SHOWN])}{more})")
    nothing = "; nothing changed, nothing mapped" if counts["current"] == len(rows) else ""
    return f"map: {len(rows)} scene(s) in {seconds:.1f} s: {', '.join(parts)}{nothing} -> {shown(out)}"


def _log_run(params, model, rows, classes, seconds, catalog, store, texts) -> str | None:
    if not store_configured():
        return None
    tags = {"catalog": shown(catalog), "out": shown(store.location), "run_name": f"map-{len(rows)}-scenes"}
    try:
        return log_map_run(params.track.experiment, model.described, tags,
                           map_metrics(rows, classes, seconds), texts)  # fmt: skip
    except TilepipeError as exc:
        print(f"map: {exc}")
        return None


def map_archive(
    params: Params, catalog: str | Path | None, model_spec: str, out: str | Path | None, options: MapOptions,
    prefetch: Prefetch | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Map every scene of the archive whose map is missing or stale, one at a time; the run's summary."""
    started = time.perf_counter()
    catalog, out = where(catalog, out, params)
    jobs, rows, model = prepare(params, catalog, model_spec, out, options, prefetch)
    store = open_store(out)
    progress = Progress(len(jobs))
    for job in jobs:
        rows.append(map_with_retries(job, params, model, store, options))
        progress.update(rows[-1])
    return finish(params, store, rows, model, catalog, time.perf_counter() - started)
