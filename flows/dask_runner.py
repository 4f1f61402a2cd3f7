"""Where the flow's tile tasks run: a thread pool here, or a Dask cluster through prefect-dask.

``orchestrate.runner: dask`` sends each tile task to a Dask worker process: the cluster at
``orchestrate.dask_address`` (``dask scheduler`` + ``dask worker`` processes, on any machines that
share the project's folder at the same path), or, with no address, a LocalCluster of
``tile.workers`` single-threaded processes on 127.0.0.1, started for the run and stopped after it.
A worker that dies mid-scene leaves only a temp folder; Dask runs its tasks again on another worker.
Every worker is prepared before its first task (``flows/dask_workers.py``: glibc keeps freed memory,
which the nanny's environment turns off).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from tilepipe.errors import TilepipeError
from tilepipe.geo.scenes import SceneRecord
from tilepipe.params import Params
from tilepipe.redaction import redact

CONNECT_TIMEOUT_S = 20  # seconds for the client to reach the scheduler


def task_runner(params: Params) -> TaskRunner:
    """The task runner of ``orchestrate``: a thread pool of ``tile.workers``, or prefect-dask's."""
    settings = params.orchestrate
    if settings.runner == "threads":
        return ThreadPoolTaskRunner(max_workers=params.tile.workers)
    # only when asked for: importing distributed takes ~1 s
    from tilepipe.flows.dask_workers import WorkerReadyDaskRunner

    if settings.dask_address:
        timeout = {"timeout": CONNECT_TIMEOUT_S}
        return WorkerReadyDaskRunner(address=settings.dask_address, client_kwargs=timeout)
    cluster = {
        "n_workers": params.tile.workers,
        "threads_per_worker": 1,  # a tile task keeps ~1.4 cores busy with its own threads
        "processes": True,
        "host": "127.0.0.1",
        "dashboard_address": None,
    }
    return WorkerReadyDaskRunner(cluster_kwargs=cluster)


def for_workers(params: Params, scene: SceneRecord) -> SceneRecord:
    """A scene record whose image and labels are absolute paths, for a worker started elsewhere.

    The catalog's paths are relative to the project folder, a Dask worker's working directory need
    not be; the shared file system must hold the project at the same path on every machine.
    """
    if params.orchestrate.runner == "threads":
        return scene
    return replace(scene, image=_absolute(scene.image), labels=_absolute(scene.labels))


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)  # a URI is left as it is


def check_scheduler(params: Params) -> None:
    """Fail in one line, before any task, when no Dask scheduler listens at ``orchestrate.dask_address``."""
    address = params.orchestrate.dask_address
    if params.orchestrate.runner != "dask" or not address:
        return
    host, _, port = address.partition("://")[2].rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise TilepipeError(
            f"orchestrate.dask_address: no Dask scheduler answers at {redact(address)} ({exc}); "
            "start one with `dask scheduler` or set orchestrate.runner: threads"
        ) from None


@contextmanager
def api_for_workers(params: Params) -> Iterator[None]:
    """Tasks sent to Dask carry the API URL of this run: the temporary server's, when there is no other.

    A task takes its settings from the flow's context; without PREFECT_API_URL each worker process
    would start a temporary server of its own (a minute here) instead of reporting to the flow's.
    """
    if params.orchestrate.runner == "threads" or PREFECT_API_URL.value():
        yield
        return
    with get_client(sync_client=True) as client:
        url = str(client.api_url)
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield
