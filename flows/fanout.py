"""Mapping a task over items: one named task run each, a bounded number at once, all awaited."""

from __future__ import annotations

from typing import Any

from prefect import Task
from prefect.futures import wait
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner


def run_each(
    task: Task, calls: list[tuple[str, dict[str, Any]]], workers: int, runner: TaskRunner | None = None
) -> list[Any]:
    """Run ``task`` once per (run name, arguments), ``workers`` at a time; results in order.

    ``runner`` (default: a thread pool of ``workers``) is where the runs go, e.g. a Dask cluster
    (``flows/dask_runner.py``), which then bounds how many run at once. Every run finishes (or
    fails) before the first failure is raised, so one bad item does not cut the others short.
    """
    with runner or ThreadPoolTaskRunner(max_workers=workers) as pool:
        futures = [pool.submit(task.with_options(task_run_name=name), args) for name, args in calls]
        wait(futures)
        return [f.result() for f in futures]
