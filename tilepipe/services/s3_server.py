"""The stack's S3 server: moto's S3 API that answers signed requests with the stack's key only.

``python -m tilepipe.services.s3_server PORT`` serves on 127.0.0.1:PORT. The key comes from
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` in its environment (never its command line): it
is made an IAM user's key before the first request, with moto's request authentication on
(``INITIAL_NO_AUTH_ACTION_COUNT=0``), so the same key works after a restart. ``moto_server``
itself would also answer its ``/moto-api/`` routes to anyone: they dump every object and key
(``/moto-api/data.json``) and reset the server, so they are refused here, as is any request
without a signature header: moto checks only those, and a presigned URL (a query signature) would
make it fail with a 500 that clients retry for minutes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

USER = "tilepipe"
ALLOW_ALL = '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}'
DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>a request signed in its Authorization header is required</Message></Error>"
)


def signed(environ: dict[str, Any]) -> bool:
    """True for a request signed in its ``Authorization`` header (what moto checks)."""
    return bool(environ.get("HTTP_AUTHORIZATION"))


def guarded(app: Callable) -> Callable:
    """``app`` behind a gate: no ``/moto-api/`` routes, nothing without a signature header."""

    def gate(environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "").startswith("/moto-api") or not signed(environ):
            start_response("403 Forbidden", [("Content-Type", "application/xml"),
                                             ("Content-Length", str(len(DENIED)))])  # fmt: skip
            return [DENIED]
        return app(environ, start_response)

    return gate


def add_key(key_id: str, secret: str) -> None:
    """Make ``key_id``/``secret`` the access key of an IAM user allowed everything."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.iam.models import iam_backends

    iam = iam_backends[DEFAULT_ACCOUNT_ID]["aws"]
    iam.create_user(region_name="us-east-1", user_name=USER)
    key = iam.create_access_key(USER)
    iam.access_keys.pop(key.physical_resource_id)  # moto made its own: ours replaces it
    key.access_key_id, key.secret_access_key = key_id, secret
    iam.access_keys[key.physical_resource_id] = key
    iam.put_user_policy(USER, "all", ALLOW_ALL)


def serve(port: int) -> None:
    """Serve the gated S3 API on 127.0.0.1:port until stopped."""
    os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"  # read when moto's settings are imported
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import run_simple

    add_key(os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"])
    app = guarded(DomainDispatcherApplication(create_backend_app))
    run_simple("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
