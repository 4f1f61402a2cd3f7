"""Running the scene-scaling study: one child process per training, an MLflow parent run, the report.

This is the edge around stages/study.py (like stages/tracking.py around training): the CLI and
the Prefect flow (flows/study.py) share these functions. torch's thread count is per process, so
each training runs in its own process (stages/study_worker.py, forked from a forkserver that has
imported torch once) with ``study.threads`` threads, and at most ``study.parallel`` at once.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import multiprocessing
import multiprocessing.context
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from stages.errors import TilepipeError
from stages.fsutil import write_json
from stages.params import Params
from stages.study import plan_study
from stages.study_report import terminal_table, write_outputs
from stages.tracking import tracking_uri, training_run

PR_SET_PDEATHSIG = 1  # prctl(2): signal this process when its parent ends


def cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def parallelism(params: Params) -> int:
    """Trainings at once: ``study.parallel``, or as many as the cores hold at ``study.threads`` each."""
    return params.study.parallel or max(1, cores() // params.study.threads)


@contextmanager
def study_lock(out: Path) -> Iterator[None]:
    """Hold ``out/.study.lock`` for the study: a second study writing into ``out`` is an error."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".study.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TilepipeError(f"{out}: another study is writing here; wait for it or use --out") from None
        yield


def prepare(params: Params, tiles_dir: Path, split_json: Path, out: Path) -> dict[str, Any]:
    """Plan the study; its split files replace ``out/runs`` of an earlier study."""
    return plan_study(params, Path(tiles_dir), Path(split_json), Path(out) / "runs")


@contextmanager
def parent_run(params: Params, split_json: Path, plan: dict[str, Any]) -> Iterator[str]:
    """The study's MLflow run (params, lineage and study tags); yields its id for the children."""
    import mlflow

    with training_run(params, Path(split_json), run_name="study") as run:
        mlflow.set_tags(
            {
                "study": "scene-scaling",
                "study.sizes": ",".join(str(s) for s in plan["sizes"]),
                "study.repeats": str(plan["repeats"]),
                "study.train_tiles": str(plan["train_tiles"]),
                "study.test_scenes": " ".join(plan["test_scenes"]),
                "study.trainings": str(len(plan["trainings"])),
            }
        )
        yield run.info.run_id


def _forkserver() -> multiprocessing.context.ForkServerContext:
    """Processes forked from one server that has imported torch, MLflow and the stages already."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["stages.study_worker"])
    return context


def _die_with_parent() -> None:
    """Linux: end this training when the forkserver ends (it ends with the study's process)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent is already gone
        os._exit(1)


def child(spec_path: str, log_path: str) -> None:
    """Process target, forked from the forkserver: output goes to ``log_path``; a user mistake exits 1."""
    _die_with_parent()
    spec = json.loads(Path(spec_path).read_text())
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    # The forkserver was started once, maybe for another study: take this study's directory and store.
    os.chdir(spec["cwd"])
    os.environ["MLFLOW_TRACKING_URI"] = spec["tracking_uri"]
    warnings.filterwarnings("ignore", module="rasterio")
    warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")
    from stages.study_worker import work  # preloaded in the forkserver: no import cost here

    try:
        work(spec)
    except TilepipeError as exc:
        print(f"tilepipe study: error: {exc}", file=sys.stderr)
        sys.exit(1)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def launch(
    params: Params, training: dict[str, Any], tiles_dir: Path, split_json: Path, parent_run_id: str
) -> dict[str, Any]:
    """Run one training in a child process with its thread budget; return its result row."""
    folder = Path(training["dir"])
    spec = folder / "spec.json"
    write_json(
        spec,
        {
            "training": training,
            "params": params.model_dump(mode="json"),
            "tiles": str(Path(tiles_dir).resolve()),
            "split": str(Path(split_json).resolve()),
            "parent_run_id": parent_run_id,
            "cwd": str(Path.cwd()),
            "tracking_uri": tracking_uri(),
        },
    )
    log = folder / "train.log"
    proc = _forkserver().Process(target=child, args=(str(spec), str(log)), name=f"study-{training['name']}")
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        lines = [line for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
        last = lines[-1] if lines else "no output"
        raise TilepipeError(f"{log}: study training {training['name']} failed (exit {proc.exitcode}): {last}")
    return json.loads((folder / "result.json").read_text())


def run_all(
    params: Params,
    plan: dict[str, Any],
    tiles_dir: Path,
    split_json: Path,
    parent_run_id: str,
    done: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Every training of the plan, ``parallelism(params)`` at a time; the first failure stops the rest."""
    with ThreadPoolExecutor(max_workers=parallelism(params)) as pool:
        futures = [
            pool.submit(launch, params, t, tiles_dir, split_json, parent_run_id) for t in plan["trainings"]
        ]
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                if future.exception() is not None:
                    for other in pending:
                        other.cancel()  # not started yet: never start; running ones finish
                    raise future.exception()
                if done is not None:
                    done(future.result())
        return [f.result() for f in futures]


def finish(
    params: Params, plan: dict[str, Any], rows: list[dict[str, Any]], out: Path, parent_run_id: str
) -> dict[str, Any]:
    """Write the table, CSV and plot; log them and the per-size scores to the parent run; print."""
    from mlflow import MlflowClient

    out = Path(out)
    summary = write_outputs(out, plan, rows)
    client = MlflowClient(tracking_uri())
    metric = summary["metric"]
    for size, stats in summary["by_size"].items():
        for name in ("mean", "min", "max"):
            key = f"heldout_{metric}" + ("" if name == "mean" else f"_{name}")
            client.log_metric(parent_run_id, key, stats[name], step=int(size))
    if "trap" in summary:
        client.log_metric(parent_run_id, f"trap_self_{metric}", summary["trap"]["self"]["mean"])
        client.log_metric(parent_run_id, f"trap_heldout_{metric}", summary["trap"]["heldout"]["mean"])
    for name in ("study.csv", "study.json", "study.png"):
        client.log_artifact(parent_run_id, str(out / name), artifact_path="study")
    print(terminal_table(summary))
    print(f"study: wrote {out / 'study.csv'}, {out / 'study.png'}; MLflow parent run {parent_run_id}")
    return summary


def progress(total: int) -> Callable[[dict[str, Any]], None]:
    """A ``done`` callback printing one line per finished training."""
    started, count = time.perf_counter(), [0]

    def report(row: dict[str, Any]) -> None:
        count[0] += 1
        own = f", self-score {row['self']:.3f}" if row["self"] is not None else ""
        print(
            f"study: {row['name']} ({row['scenes']}) held-out {row['heldout']:.3f}{own} "
            f"[{count[0]}/{total}, {time.perf_counter() - started:.0f} s]",
            flush=True,
        )

    return report


def run_study(params: Params, tiles_dir: Path, split_json: Path, out: Path) -> dict[str, Any]:
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
