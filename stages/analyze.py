"""Analyze stage: band statistics and class pixel counts of the training tiles only.

One streaming pass over the training scenes' tiles (nodata excluded, memory flat in scene size and
count) gives ``data/stats/stats.json``: per band mean, std, 2nd and 98th percentiles (all together
and per training scene), the class pixel counts, and the ground resolutions the tiles are at.
Val and test scenes are never read: what they hold cannot reach the statistics a model is trained with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tilepipe.errors import TilepipeError
from tilepipe.fsutil import write_json
from tilepipe.geo.scenes import read_scene_records
from tilepipe.params import Params
from tilepipe.tiles.analysis import analyze_tiles


def training_gsd(params: Params, scenes_json: Path, scene_ids: list[str]) -> list[float]:
    """[lowest, highest] ground resolution (m) of the training tiles: ``tile.gsd``, else the scenes' own."""
    if params.tile.gsd is not None:
        return [params.tile.gsd, params.tile.gsd]
    gsd = {r.scene_id: r.gsd_m for r in read_scene_records(scenes_json)}
    found = [gsd[s] for s in scene_ids if s in gsd]
    if not found:
        raise TilepipeError(f"{scenes_json}: none of the training scenes is in the ingest record")
    return [round(min(found), 6), round(max(found), 6)]


def analyze(
    params: Params, scenes_json: Path, tiles_dir: Path, split_json: Path, out: Path
) -> dict[str, Any]:
    """Write the training tiles' statistics to ``out`` (JSON) and print a line per band."""
    members = json.loads(Path(split_json).read_text())["members"]["train"]
    if not members:
        raise TilepipeError(f"{split_json}: the train split is empty")
    try:
        stats = analyze_tiles(Path(tiles_dir), members, params.data.class_names)
    except ValueError as exc:
        raise TilepipeError(f"{split_json}: {exc}") from None
    stats = {**stats, "gsd_m": training_gsd(params, scenes_json, sorted(members))}
    write_json(out, stats)
    print(
        f"analyze: {stats['tiles']} training tiles of {len(members)} scene(s), "
        f"{stats['pixels']} valid pixels per band -> {out}"
    )
    for i, band in enumerate(stats["bands"]):
        figures = " ".join(f"{k} {stats[k][i]:.4f}" for k in ("mean", "std", "p2", "p98"))
        print(f"analyze: {band}: {figures}")
    return stats
