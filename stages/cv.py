"""CV stage: scene-grouped cross-validation, every labelled scene tested once (not a DVC stage)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tilepipe.params import Params
from tilepipe.study.cv import cv_parent_run, finish_cv, plan_cv, progress, require_inputs
from tilepipe.study.runner import parallelism, run_all, study_lock


def cv(params: Params, scenes_json: Path, tiles_dir: Path, out: Path, cv_json: Path) -> dict[str, Any]:
    """``tilepipe cv``: plan the folds, train and score them concurrently, write ``cv_json``."""
    started = time.perf_counter()
    require_inputs(scenes_json, tiles_dir)
    with study_lock(out, "cross-validation"):
        plan = plan_cv(params, scenes_json, tiles_dir, out)
        total = len(plan["trainings"])
        print(
            f"cv: {total} folds over {len(plan['scenes'])} labelled scenes, {plan['epochs']} epoch(s) each, "
            f"{parallelism(params)} at a time, {params.study.threads} thread(s) each"
        )
        with cv_parent_run(params, plan) as run_id:
            rows = run_all(params, plan, tiles_dir, Path(plan["folds_json"]), run_id, done=progress(total))
            doc = finish_cv(plan, rows, cv_json, run_id)
    print(f"cv: {time.perf_counter() - started:.0f} s")
    return doc
