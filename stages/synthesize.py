"""Synthesize stage: write the built-in scene collection and its catalog (nothing is downloaded)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from tilepipe.fsutil import atomic_dir
from tilepipe.params import SynthesizeParams
from tilepipe.synth.fields import BANDS
from tilepipe.synth.plan import Plan, plan_scenes
from tilepipe.synth.scenes import write_image, write_label_geojson, write_label_raster


def _write_scene(plan: Plan, folder: Path, seed: int, values: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Write one scene's image and labels into ``folder``; its catalog row and description."""
    image = f"{plan.sid}.tif"
    nodata = write_image(plan, folder / image, seed)
    if plan.labels == "raster":
        labels = f"{plan.sid}_labels.tif"
        write_label_raster(plan, folder / labels, values)
    else:
        labels = f"{plan.sid}_labels.geojson"
        write_label_geojson(plan, folder / labels, values, names)
    bands = "" if plan.described else ";".join(f"{b}={i}" for i, b in enumerate(BANDS, 1))
    crs = plan.crs.to_string()
    print(f"synthesize: {plan.sid} {plan.width}x{plan.height} {crs} gsd {plan.gsd:g} m "
          f"{plan.dtype} {plan.sensor} nodata {nodata:.0%} labels {labels}", flush=True)  # fmt: skip
    return {
        "row": {"scene_id": plan.sid, "image": image, "labels": labels, "bands": bands},
        "scene": {"scene_id": plan.sid, "width": plan.width, "height": plan.height,
                  "crs": crs, "gsd": plan.gsd, "dtype": plan.dtype, "sensor": plan.sensor,
                  "labels": labels, "label_crs": plan.label_crs.to_string(),
                  "nodata": round(nodata, 4)},  # fmt: skip
    }


def synthesize(params: SynthesizeParams, out_dir: Path) -> dict:
    """Write the synthetic scene collection and ``catalog.csv`` to ``out_dir`` (replaced whole).

    Its classes are ``synthesize.classes`` (checked when params load), never ``data.classes``.
    """
    names = [c.name for c in params.classes]
    values = np.array([c.value for c in params.classes], np.uint8)
    with atomic_dir(out_dir) as tmp:
        plans = plan_scenes(params, len(names))
        written = [_write_scene(plan, tmp, params.seed, values, names) for plan in plans]
        with open(tmp / "catalog.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["scene_id", "image", "labels", "bands"])
            writer.writeheader()
            writer.writerows(w["row"] for w in written)
    scenes = [w["scene"] for w in written]
    return {"catalog": str(Path(out_dir) / "catalog.csv"), "scenes": scenes,
            "classes": names, "pixels": sum(s["width"] * s["height"] for s in scenes)}  # fmt: skip
