"""Split stage: whole scenes go to train / val / test, so evaluation is on unseen places."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tilepipe.errors import TilepipeError
from tilepipe.fsutil import write_json
from tilepipe.geo.scenes import read_scene_records
from tilepipe.params import Params
from tilepipe.tiles.splitting import SPLITS, assign_members, class_warnings, count_split, print_summary
from tilepipe.tiles.store import read_index


def split(params: Params, scenes_json: Path, tiles_dir: Path, out: Path) -> dict[str, Any]:
    """Assign scenes (or opted-in spatial blocks) to splits and write ``out`` (JSON)."""
    scenes = read_scene_records(scenes_json)
    indexes = {s.scene_id: read_index(Path(tiles_dir) / s.scene_id) for s in scenes}
    members = assign_members(scenes, indexes, params, scenes_json)
    counts = {name: count_split(members[name], indexes, params.data.class_names) for name in SPLITS}
    for name in SPLITS:
        if params.split.ratios[name] > 0 and counts[name]["tiles"] == 0:
            why = (
                f"no scene was assigned to it ({len(scenes)} scene(s) for 3 splits)"
                if not members[name]
                else "its scenes kept no tile (all dropped for nodata?)"
            )
            raise TilepipeError(f"{scenes_json}: split '{name}' is empty: {why}")
    result = {
        "mode": "blocks" if params.split.spatial_blocks else "scenes",
        "members": {k: dict(sorted(v.items())) for k, v in members.items()},
        "counts": counts,
    }
    write_json(out, result)
    print_summary(result, params.data.class_names)
    for warning in class_warnings(counts, params.data.class_names):
        print(f"warning: {scenes_json}: {warning}", file=sys.stderr)
    return result
