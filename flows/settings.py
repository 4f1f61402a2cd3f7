"""Prefect settings of the tilepipe entry points: no analytics, a patient temporary server, a live API."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager

import httpx
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_SERVER_ANALYTICS_ENABLED,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    temporary_settings,
)

from tilepipe.errors import TilepipeError

EPHEMERAL_STARTUP_S = 120  # Prefect's default of 20 s is too short on a busy 2-core machine
START_SERVER = "start a server with `prefect server start --host 127.0.0.1` and set PREFECT_API_URL"


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


def check_api() -> str:
    """The Prefect API URL, checked to answer; serving needs a server that outlives this process."""
    url = PREFECT_API_URL.value()
    if not url:
        raise TilepipeError(f"PREFECT_API_URL is not set: {START_SERVER}")
    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=10).raise_for_status()
    except httpx.HTTPError as exc:
        raise TilepipeError(f"Prefect API {url} does not answer ({exc}): {START_SERVER}") from None
    return url
