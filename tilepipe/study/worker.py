"""One study training in its own process, forked by tilepipe/study/runner.py from a forkserver.

The forkserver imports this module once, with torch and MLflow, so a training starts in a second
rather than paying those imports again. Its MLflow run is a child of the study's run (tag
``mlflow.parentRunId``) and logs the same per-epoch metrics as ``tilepipe train``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch._dynamo  # noqa: F401 - imported by the first optimiser; here once, in the forkserver

from tilepipe.fsutil import write_json
from tilepipe.params import validate
from tilepipe.study.plan import run_training, training_params
from tilepipe.tracking.runs import (
    log_epoch,
    log_evaluation,
    log_run_metrics,
    log_training_files,
    training_run,
)


def work(spec: dict[str, Any]) -> dict[str, Any]:
    """Train and score one study model (or cross-validation fold) in a child MLflow run; write its row."""
    params = validate(spec["params"], source="study")
    torch.set_num_threads(params.study.threads)
    training, folder = spec["training"], Path(spec["training"]["dir"])
    tp = training_params(params, training["seed"], training.get("epochs"))
    tags = training.get("tags") or {  # a cross-validation fold brings its own
        "study.kind": training["kind"],
        "study.size": str(training["size"]),
        "study.repeat": str(training["repeat"]),
        "study.scenes": " ".join(training["scenes"]),
        "study.train_tiles": str(training["train_tiles"]),
    }
    tags = {"mlflow.parentRunId": spec["parent_run_id"], **tags}
    name = training.get("run_name") or f"study-{training['name']}"
    with training_run(tp, folder / "split.json", name=name, tags=tags) as run:
        row = run_training(params, training, Path(spec["tiles"]), Path(spec["split"]), on_epoch=log_epoch)
        if row["self"] is not None:
            log_run_metrics({f"self_{k}": float(v) for k, v in row["self_metrics"].items()})
        log_training_files(folder / "model")
    log_evaluation(run.info.run_id, row.pop("heldout_metrics"), folder / "heldout")
    row["run_id"] = run.info.run_id
    write_json(folder / "result.json", row)
    return row
