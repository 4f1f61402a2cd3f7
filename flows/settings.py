"""Prefect settings of the tilepipe entry points: no analytics, a patient temporary server."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager

from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_SERVER_ANALYTICS_ENABLED,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    temporary_settings,
)

EPHEMERAL_STARTUP_S = 120  # Prefect's default of 20 s is too short on a busy 2-core machine


def prefect_settings() -> AbstractContextManager:
    """Settings for a flow run or a serving process started by ``tilepipe``.

    Analytics are always off. Without PREFECT_API_URL, Prefect starts a temporary server for the
    run; it is given up to 120 s to start.
    """
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"  # for any server started from here
    updates: dict = {PREFECT_SERVER_ANALYTICS_ENABLED: False}
    if not PREFECT_API_URL.value():
        timeout = max(EPHEMERAL_STARTUP_S, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
        updates[PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS] = timeout
    return temporary_settings(updates=updates)
