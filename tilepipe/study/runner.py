"""Running the scene-scaling study: one child process per training, an MLflow parent run, the report.

The study stage (stages/study.py) and the Prefect flow (flows/study.py) share these functions.
torch's thread count is per process, so each training runs in its own process
(tilepipe/study/worker.py, forked from a forkserver that has imported torch once) with
``study.threads`` threads, and at most ``study.parallel`` at once.
"""

from __future__ import annotations

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

from tilepipe.errors import TilepipeError
from tilepipe.fsutil import write_json
from tilepipe.params import Params
from tilepipe.processes import cores, die_with_parent
from tilepipe.study.plan import plan_study
from tilepipe.study.report import terminal_table, write_outputs
from tilepipe.tracking.runs import log_study, params_hash, training_run
from tilepipe.tracking.store import tracking_uri


def parallelism(params: Params) -> int:
    """Trainings at once: ``study.parallel``, or as many as the cores hold at ``study.threads`` each."""
    return params.study.parallel or max(1, cores() // params.study.threads)


@contextmanager
def study_lock(out: Path, what: str = "study") -> Iterator[None]:
    """Hold ``out/.study.lock`` for the study (or ``what``): a second one writing into ``out`` is an error."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".study.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TilepipeError(f"{out}: another {what} is writing here; wait for it or use --out") from None
        yield


def prepare(params: Params, tiles_dir: Path, split_json: Path, out: Path) -> dict[str, Any]:
    """Plan the study; its split files replace ``out/runs`` of an earlier study."""
    return plan_study(params, Path(tiles_dir), Path(split_json), Path(out) / "runs")


@contextmanager
def parent_run(params: Params, split_json: Path, plan: dict[str, Any]) -> Iterator[str]:
    """The study's MLflow run (params, lineage and study tags); yields its id for the children."""
    tags = {
        "study": "scene-scaling",
        "study.sizes": ",".join(str(s) for s in plan["sizes"]),
        "study.repeats": str(plan["repeats"]),
        "study.train_tiles": str(plan["train_tiles"]),
        "study.test_scenes": " ".join(plan["test_scenes"]),
        "study.trainings": str(len(plan["trainings"])),
    }
    name = f"study-{params.train.model}-w{params.train.width}-{params_hash(params)}"
    with training_run(params, Path(split_json), name=name, tags=tags) as run:
        yield run.info.run_id


def _forkserver() -> multiprocessing.context.ForkServerContext:
    """Processes forked from one server that has imported torch, MLflow and the training code already."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["mlflow", "tilepipe.study.worker"])
    return context


LOST_STATUS = 255  # multiprocessing.popen_forkserver's exit code when the status cannot be read
MLFLOW_CONNECTION = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def store_env() -> dict[str, str]:
    """The tracking store and its credentials, handed to a child in memory (never in spec.json)."""
    env = {k: os.environ[k] for k in MLFLOW_CONNECTION if k in os.environ}
    return {**env, "MLFLOW_TRACKING_URI": tracking_uri()}


def child(spec_path: str, log_path: str, store: dict[str, str]) -> None:
    """Process target, forked from the forkserver: output goes to ``log_path``; a user mistake exits 1."""
    die_with_parent(sig=signal.SIGTERM)  # the forkserver ends with the study's process
    spec = json.loads(Path(spec_path).read_text())
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    # The forkserver was started once, maybe for another study: take this study's directory and store.
    os.chdir(spec["cwd"])
    os.environ.update(store)
    warnings.filterwarnings("ignore", module="rasterio")
    warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")
    from tilepipe.study.worker import work  # preloaded in the forkserver: no import cost here

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
        },
    )
    log, result = folder / "train.log", folder / "result.json"
    result.unlink(missing_ok=True)  # written last by the child: present after it means this run finished
    args = (str(spec), str(log), store_env())
    proc = _forkserver().Process(target=child, args=args, name=f"study-{training['name']}")
    proc.start()
    proc.join()
    if proc.exitcode != 0 and not status_lost(proc.exitcode, result):
        lines = [line for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
        last = lines[-1] if lines else "no output"
        raise TilepipeError(f"{log}: study training {training['name']} failed (exit {proc.exitcode}): {last}")
    return json.loads(result.read_text())


def status_lost(exitcode: int | None, result: Path) -> bool:
    """True when the forkserver lost a finished child's exit status: 255 and the result written.

    Python < 3.14's forkserver sometimes reports 255 ("could not read the status") for children
    joined from several threads at once (CPython issue 140867): seen once here, a cross-validation
    fold whose log and complete result.json showed it had finished while its siblings reported 0.
    The child writes result.json atomically as its very last step, so with it present the run is
    whole; the child itself never exits with 255 (0, 1 for a user mistake, or a signal).
    """
    return exitcode == LOST_STATUS and result.is_file()


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
    out = Path(out)
    summary = write_outputs(out, plan, rows)
    log_study(parent_run_id, summary, out)
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
