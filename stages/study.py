"""Study stage: the held-out score against the number of training scenes (the scene-scaling study)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tilepipe.params import Params
from tilepipe.study.runner import finish, parallelism, parent_run, prepare, progress, run_all, study_lock


def study(params: Params, tiles_dir: Path, split_json: Path, out: Path) -> dict[str, Any]:
    """``tilepipe study``: plan, train every subset and trap concurrently, report."""
    started = time.perf_counter()
    with study_lock(out):
        plan = prepare(params, tiles_dir, split_json, out)
        total = len(plan["trainings"])
        print(
            f"study: {total} trainings (sizes {plan['sizes']}, {plan['repeats']} repeat(s), "
            f"{plan['repeats']} trap(s)), {parallelism(params)} at a time, "
            f"{params.study.threads} thread(s) each"
        )
        with parent_run(params, split_json, plan) as run_id:
            rows = run_all(params, plan, tiles_dir, split_json, run_id, done=progress(total))
            summary = finish(params, plan, rows, out, run_id)
    print(f"study: {time.perf_counter() - started:.0f} s")
    return {**summary, "run_id": run_id}
