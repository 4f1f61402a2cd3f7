"""The four servers of the stack: how each starts, what it answers, its URL, and the client variables.

PostgreSQL (:mod:`.postgres`), an S3 API from moto (:mod:`.s3_server`), an MLflow tracking server
on both with its basic-auth app, a Prefect server on the same PostgreSQL with an API auth string.
Each is a command run by :mod:`.procs`; none is imported here (each runs in its own process).
Every server asks for the credentials of :mod:`.credentials`; they reach the servers in their
environment, never on their command line.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from tilepipe.errors import TilepipeError
from tilepipe.fsutil import write_text
from tilepipe.services.credentials import MLFLOW_ADMIN, Credentials
from tilepipe.services.procs import http_answers, http_ok

BIN = Path(sys.executable).parent
BUCKETS = ("tilepipe-scenes", "tilepipe-dvc", "tilepipe-mlflow")  # scenes, the DVC remote, MLflow artifacts
REGION = "us-east-1"
AUTH_INI = """[mlflow]
default_permission = READ
database_uri = sqlite:///{database}
admin_username = {admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
"""


@dataclass(frozen=True)
class Ports:
    """The port of each server (chosen once, kept in the state file, reused on restart)."""

    postgres: int
    s3: int
    mlflow: int
    prefect: int


def pg_url(ports: Ports, database: str, driver: str = "", user: str = "", password: str = "") -> str:
    """A SQLAlchemy URL of one database of the stack's PostgreSQL (with ``user:password`` if given)."""
    scheme = f"postgresql+{driver}" if driver else "postgresql"
    login = f"{user}:{password}@" if user else ""
    return f"{scheme}://{login}127.0.0.1:{ports.postgres}/{database}"


def urls(ports: Ports) -> dict[str, str]:
    """What ``status`` shows for each server (no credentials)."""
    return {
        "postgres": pg_url(ports, "postgres"),
        "s3": f"http://127.0.0.1:{ports.s3}",
        "mlflow": f"http://127.0.0.1:{ports.mlflow}",
        "prefect": f"http://127.0.0.1:{ports.prefect}/api",
    }


def s3_env(ports: Ports, creds: Credentials) -> dict[str, str]:
    """The S3 endpoint and key, as boto3 (so DVC and MLflow) and GDAL's /vsis3/ read them."""
    s3 = f"http://127.0.0.1:{ports.s3}"
    return {
        "AWS_ENDPOINT_URL": s3,  # boto3, s3fs and so dvc-s3
        "MLFLOW_S3_ENDPOINT_URL": s3,
        "AWS_ACCESS_KEY_ID": creds.s3_key_id,
        "AWS_SECRET_ACCESS_KEY": creds.s3_secret,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_S3_ENDPOINT": f"127.0.0.1:{ports.s3}",  # GDAL's /vsis3/
        "AWS_HTTPS": "NO",
        "AWS_VIRTUAL_HOSTING": "FALSE",
    }


def client_env(ports: Ports, creds: Credentials) -> dict[str, str]:
    """The variables a user exports to use the stack (MLflow, Prefect, boto3/DVC and GDAL's S3)."""
    return {
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports.mlflow}",
        "MLFLOW_TRACKING_USERNAME": MLFLOW_ADMIN,
        "MLFLOW_TRACKING_PASSWORD": creds.mlflow_admin,
        # artifacts through the server, never by the presigned S3 URLs it offers (MLflow >= 3.x
        # uses them by default): the S3 server takes header signatures only (s3_server.py)
        "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false",
        "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "false",
        "PREFECT_API_URL": f"http://127.0.0.1:{ports.prefect}/api",
        "PREFECT_API_AUTH_STRING": creds.prefect_auth,
        **s3_env(ports, creds),
        "TILEPIPE_DATABASE_URL": pg_url(ports, "postgres", user="postgres", password=creds.postgres),
    }


def base_env() -> dict[str, str]:
    """The environment without a proxy: every server and client here is on 127.0.0.1."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


# --- S3 (moto) ------------------------------------------------------------------------------------


def s3_argv(port: int) -> list[str]:
    """The gated moto S3 server on 127.0.0.1:port (objects kept in its memory)."""
    return [sys.executable, "-m", "tilepipe.services.s3_server", str(port)]


def s3_server_env(ports: Ports, creds: Credentials) -> dict[str, str]:
    """The S3 server's environment: its one key (``AWS_*``), nothing else of the stack."""
    env = {k: v for k, v in base_env().items() if not k.startswith(("AWS_", "MLFLOW_", "PREFECT_"))}
    return {**env, **s3_env(ports, creds)}


def s3_ready(port: int) -> bool:
    """True if the S3 server answers (it refuses the unsigned probe: that is an answer)."""
    return http_answers(f"http://127.0.0.1:{port}/")


def s3_create_buckets(ports: Ports, creds: Credentials) -> None:
    """Create the stack's buckets (those missing)."""
    import boto3

    env = s3_env(ports, creds)
    s3 = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=creds.s3_key_id,
        aws_secret_access_key=creds.s3_secret,
        region_name=REGION,
    )
    try:
        have = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        for bucket in BUCKETS:
            if bucket not in have:
                s3.create_bucket(Bucket=bucket)
    except Exception as exc:  # noqa: BLE001 - botocore's errors: the server answered but refused
        where = env["AWS_ENDPOINT_URL"]
        raise TilepipeError(f"services: cannot create the buckets at {where}: {exc}") from None


# --- MLflow and Prefect -------------------------------------------------------------------------


def mlflow_argv(ports: Ports) -> list[str]:
    """The tracking server with its basic-auth app: runs in PostgreSQL, artifacts proxied to the bucket."""
    return [
        str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(ports.mlflow),
        "--app-name", "basic-auth",
        "--artifacts-destination", f"s3://{BUCKETS[2]}/mlflow",
        "--workers", "1",  # one process, requests in its thread pool: a lighter start
    ]  # fmt: skip


def mlflow_auth_config(home: Path) -> Path:
    """Write the basic-auth app's settings (no secret in them): users kept in ``home/mlflow``."""
    folder = home / "mlflow"
    folder.mkdir(mode=0o700, exist_ok=True)
    ini = folder / "basic_auth.ini"
    write_text(ini, AUTH_INI.format(database=(folder / "basic_auth.db").resolve(), admin=MLFLOW_ADMIN), 0o600)
    return ini


def mlflow_env(ports: Ports, creds: Credentials, home: Path) -> dict[str, str]:
    """The tracking server's store, bucket, and admin password (made the admin's at its first start)."""
    env = {k: v for k, v in base_env().items() if not k.startswith(("AWS_", "MLFLOW_", "PREFECT_"))}
    return {
        **env,
        **s3_env(ports, creds),
        "MLFLOW_BACKEND_STORE_URI": pg_url(ports, "mlflow", "psycopg2", "mlflow", creds.mlflow_db),
        "MLFLOW_AUTH_CONFIG_PATH": str(mlflow_auth_config(home)),
        "MLFLOW_AUTH_ADMIN_USERNAME": MLFLOW_ADMIN,
        "MLFLOW_AUTH_ADMIN_PASSWORD": creds.mlflow_admin,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": creds.mlflow_flask_key,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # its job runner: 7 more processes, GenAI only
    }


def prefect_argv(ports: Ports) -> list[str]:
    """``prefect server start`` on 127.0.0.1."""
    return [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(ports.prefect)]


def prefect_env(ports: Ports, creds: Credentials, home: Path) -> dict[str, str]:
    """The Prefect server on the stack's PostgreSQL, its API behind the auth string, no analytics."""
    env = {k: v for k, v in base_env().items() if not k.startswith(("AWS_", "MLFLOW_", "PREFECT_"))}
    database = pg_url(ports, "prefect", "asyncpg", "prefect", creds.prefect_db)
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_DATABASE_CONNECTION_URL=database,
        PREFECT_SERVER_API_AUTH_STRING=creds.prefect_auth,
        PREFECT_UI_API_URL=f"http://127.0.0.1:{ports.prefect}/api",  # the UI's own calls (not :4200)
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_LEVEL="WARNING",
    )
    return env


def mlflow_ready(ports: Ports) -> bool:
    """True if the tracking server answers."""
    return http_ok(f"http://127.0.0.1:{ports.mlflow}/health")


def prefect_ready(ports: Ports) -> bool:
    """True if the Prefect API answers."""
    return http_ok(f"http://127.0.0.1:{ports.prefect}/api/health")
