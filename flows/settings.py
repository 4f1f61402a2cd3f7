"""Prefect settings of the tilepipe entry points: no analytics, a patient temporary server, a live API."""

from __future__ import annotations

import os
from base64 import b64encode
from contextlib import AbstractContextManager

import httpx
from prefect.settings import (
    PREFECT_API_AUTH_STRING,
    PREFECT_API_URL,
    PREFECT_SERVER_ANALYTICS_ENABLED,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    temporary_settings,
)

from tilepipe.errors import TilepipeError
from tilepipe.redaction import redact, redact_text

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
    """The Prefect API URL, checked to answer and to take our credentials (``PREFECT_API_AUTH_STRING``)."""
    url = PREFECT_API_URL.value()
    if not url:
        raise TilepipeError(f"PREFECT_API_URL is not set: {START_SERVER}")
    auth = PREFECT_API_AUTH_STRING.value()  # "user:password", sent as Prefect's client sends it
    headers = {"Authorization": f"Basic {b64encode(str(auth).encode()).decode()}"} if auth else {}
    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=10).raise_for_status()
        answer = httpx.get(f"{url.rstrip('/')}/admin/version", headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        raise TilepipeError(
            f"Prefect API {redact(url)} does not answer ({redact_text(exc)}): {START_SERVER}"
        ) from None
    if answer.status_code in (401, 403):
        given = (
            "refused PREFECT_API_AUTH_STRING" if auth else "needs credentials: set PREFECT_API_AUTH_STRING"
        )
        raise TilepipeError(f"Prefect API {redact(url)} {given} (HTTP {answer.status_code})")
    return url
