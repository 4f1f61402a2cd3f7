"""What every Dask worker of a run is given before its first task (imported only with ``runner: dask``).

A worker started by a nanny (``dask worker``'s default, and every LocalCluster worker) inherits
``distributed.nanny.pre-spawn-environ``, which sets ``MALLOC_TRIM_THRESHOLD_=65536``: glibc then
stops raising its mmap threshold as a program frees large blocks, so every buffer of more than
128 KiB is mapped fresh and faulted in again, zeroed, each time. A tile task's read and cut
buffers are such blocks: on one 16384 px scene, 16-19x the page faults and 56-62% more CPU than the
same tiling in a plain process (`make bench`'s `dask` entry, docs/scale-out.md).
:class:`KeepFreedMemory` has each worker keep freed memory for reuse as a plain process does
(``ml.loops.keep_freed_memory``, what training already does), for tile and map tasks alike.
"""

from __future__ import annotations

from typing import Any

from distributed import WorkerPlugin
from prefect_dask import DaskTaskRunner


class KeepFreedMemory(WorkerPlugin):
    """On every worker, now and when one joins later: glibc keeps freed blocks (mallopt)."""

    name = "tilepipe-keep-freed-memory"
    idempotent = True

    def setup(self, worker: object) -> None:
        """Runs in the worker process."""
        from tilepipe.ml.loops import keep_freed_memory

        keep_freed_memory()


WORKER_PLUGINS: tuple[WorkerPlugin, ...] = (KeepFreedMemory(),)


class WorkerReadyDaskRunner(DaskTaskRunner):
    """prefect-dask's task runner that registers :data:`WORKER_PLUGINS` on the cluster it connects to."""

    def __enter__(self) -> Any:
        """Connect (or start the LocalCluster), then prepare every worker before the first task."""
        runner = super().__enter__()
        for plugin in WORKER_PLUGINS:
            self.client.register_plugin(plugin)
        return runner
