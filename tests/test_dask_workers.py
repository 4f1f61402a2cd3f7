"""A real `dask worker` (with its nanny) is prepared by the flow's runner before its first task.

The nanny hands each worker ``MALLOC_TRIM_THRESHOLD_=65536``: glibc then maps every large buffer
fresh and faults it in again each time (56% more CPU for a tiling, docs/scale-out.md). After the
runner connects, the worker's freed buffers are reused: the page faults of reallocating one are
counted in the worker process itself, before and after.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from distributed import Client

from tests.conftest import ROOT
from tests.prefect_server import free_port
from tilepipe.flows.dask_runner import task_runner
from tilepipe.flows.dask_workers import WorkerReadyDaskRunner
from tilepipe.params import load_params

BIN = Path(sys.executable).parent
# under 4 MiB, so numpy asks no transparent huge pages for it (a 4 MiB buffer can take 2 faults, not 1024)
BUFFER_KB, TIMES = 1024, 40


def faults_of_reallocating() -> tuple[int, str | None]:
    """Minor page faults of allocating, filling and freeing a 1 MiB buffer 40 times; the trim setting."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(TIMES):
        buffer = np.empty(BUFFER_KB << 10, dtype=np.uint8)
        buffer.fill(1)
        del buffer
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return faults, os.environ.get("MALLOC_TRIM_THRESHOLD_")


@pytest.fixture
def nanny_worker(tmp_path: Path):
    """A `dask scheduler` and one `dask worker` under its nanny (the CLI's default), on 127.0.0.1."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the worker imports this test module's function
    procs, logs = [], []
    for args in (
        ["scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        ["worker", address, "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard"],
    ):
        logs.append(tmp_path / f"{args[0]}.log")
        with open(logs[-1], "w") as out:
            procs.append(subprocess.Popen(
                [str(BIN / "dask"), *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            ))  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "Registered to" not in logs[1].read_text():
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), logs[1].read_text()
            time.sleep(0.2)
        yield address
    finally:
        for proc in reversed(procs):
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


@pytest.mark.slow
def test_the_runner_makes_a_nanny_worker_keep_freed_memory(nanny_worker):
    pages = (BUFFER_KB << 10) // resource.getpagesize()
    with Client(nanny_worker, timeout=30) as client:
        (before, trim), = client.run(faults_of_reallocating).values()
        assert trim == "65536", "the nanny's environment is in force in the worker"
        assert before > TIMES * pages // 2, f"unprepared, every buffer is faulted in again ({before})"
        with WorkerReadyDaskRunner(address=nanny_worker):
            (after, _), = client.run(faults_of_reallocating).values()
    assert after < pages * 2, f"prepared, freed buffers are reused ({after} faults, {before} before)"


def test_the_dask_runner_of_the_params_prepares_its_workers():
    params = load_params(ROOT / "params.yaml", ["orchestrate.runner=dask"])
    assert isinstance(task_runner(params), WorkerReadyDaskRunner)
    local = load_params(ROOT / "params.yaml", ["orchestrate.runner=dask", "orchestrate.dask_address=tcp://h:1"])
    assert isinstance(task_runner(local), WorkerReadyDaskRunner)
