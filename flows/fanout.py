"""Mapping a task over items: one named task run each, a bounded number at once, all awaited."""

from __future__ import annotations

from typing import Any

from prefect import Task
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner


def run_each(task: Task, calls: list[tuple[str, dict[str, Any]]], workers: int) -> list[Any]:
    """Run ``task`` once per (run name, arguments), ``workers`` at a time; results in order.

    Every run finishes (or fails) before the first failure is raised, so one bad item does not
    cut the others short.
    """
    with ThreadPoolTaskRunner(max_workers=workers) as runner:
        futures = [runner.submit(task.with_options(task_run_name=name), args) for name, args in calls]
        wait(futures)
        return [f.result() for f in futures]
