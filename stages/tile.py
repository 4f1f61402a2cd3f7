"""Tile stage: cut every ingested scene that needs it into tiles, in parallel; write the summary."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from rasterio.errors import RasterioError

from tilepipe.errors import TilepipeError
from tilepipe.geo.scenes import SceneRecord, read_scene_records
from tilepipe.params import Params
from tilepipe.processes import die_with_parent
from tilepipe.tiles.cutting import plan, prune_stale, tile_scene, write_summary


def plan_tiling(params: Params, scenes_json: Path, out_dir: Path) -> list[SceneRecord]:
    """Drop tiles of scenes gone from the catalog; the scenes whose tiles are missing or stale."""
    scenes = read_scene_records(scenes_json)
    out_dir.mkdir(parents=True, exist_ok=True)
    prune_stale(scenes, out_dir)
    return plan(scenes, params, out_dir)


def tile_one(scene: SceneRecord, params: Params, out_dir: Path) -> dict[str, Any]:
    """Tile one scene into ``out_dir/<scene_id>`` (the flow maps this over the scenes)."""
    return tile_scene(scene, params, out_dir / scene.scene_id)


def _tile_or_fail(scene: SceneRecord, params: Params, out_dir: Path) -> dict[str, Any]:
    """:func:`tile_one`, a read failure turned into one line naming the image."""
    try:
        return tile_one(scene, params, out_dir)
    except RasterioError as exc:
        raise TilepipeError(f"{scene.image}: read failed ({str(exc).splitlines()[0]})") from None


def summarize_tiles(scenes_json: Path, out_dir: Path, known: dict[str, int] | None = None) -> dict[str, int]:
    """Write ``summary.json`` once every scene is tiled; the tile count per scene."""
    return write_summary(read_scene_records(scenes_json), out_dir, known)


def tile(params: Params, scenes_json: Path, out_dir: Path) -> dict[str, Any]:
    """Tile every ingested scene that needs it, ``tile.workers`` processes at once; write ``summary.json``.

    A scene that fails does not stop the others: they are tiled (and kept), then the first
    failure is raised; ``summary.json`` is written only when every scene is tiled.
    """
    total = len(read_scene_records(scenes_json))
    todo = plan_tiling(params, scenes_json, out_dir)
    print(f"tile: {len(todo)} of {total} scene(s) to tile, {total - len(todo)} up to date")
    started = time.perf_counter()
    done, failed = _tile_all(params, todo, out_dir)
    if failed:
        more = f" ({len(failed) - 1} more scene(s) failed too; run again for each)" if len(failed) > 1 else ""
        raise TilepipeError(f"{failed[0]}{more}")
    counts = summarize_tiles(scenes_json, out_dir, {d["scene_id"]: d["tile_count"] for d in done})
    return {
        "scenes": total,
        "tiled": [d["scene_id"] for d in done],
        "tiles": counts,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _tile_all(
    params: Params, todo: list[SceneRecord], out_dir: Path
) -> tuple[list[dict[str, Any]], list[str]]:
    """Tile ``todo`` in this process or a pool; the summaries of the tiled scenes, the errors of the rest."""
    done: list[dict[str, Any]] = []
    failed: list[str] = []

    def collect(summary_of: Callable[[], dict[str, Any]]) -> None:
        try:
            done.append(summary_of())
        except TilepipeError as exc:
            failed.append(str(exc))
            return
        _report(done[-1])

    if len(todo) <= 1 or params.tile.workers == 1:
        for scene in todo:
            collect(partial(_tile_or_fail, scene, params, out_dir))
        return done, failed
    workers = min(params.tile.workers, len(todo))
    ctx, parent = get_context("spawn"), os.getpid()
    with ProcessPoolExecutor(workers, ctx, initializer=die_with_parent, initargs=(parent,)) as pool:
        for future in [pool.submit(_tile_or_fail, s, params, out_dir) for s in todo]:
            collect(future.result)
    return done, failed


def _report(done: dict[str, Any]) -> None:
    rate = done["tile_count"] / max(done["seconds"], 1e-9)
    print(
        f"  {done['scene_id']}: {done['tile_count']} tiles ({done['dropped']} dropped for nodata) "
        f"in {done['seconds']:.1f} s, {rate:.0f} tiles/s",
        file=sys.stdout,
        flush=True,
    )
