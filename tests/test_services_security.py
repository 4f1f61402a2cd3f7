"""`tilepipe services up` on a shared machine: every server refuses anonymous and wrong credentials and
takes the exported ones, no folder's permissions change, the secrets stay in a mode-600 file and
the export lines (never a command line, a log or the state file)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import boto3
import httpx
import pytest
from botocore.exceptions import ClientError

from tests.services_stack import BEFORE_UP, ROOT, changed_folders, folder_modes, stack_env
from tilepipe.errors import TilepipeError
from tilepipe.services import credentials, parts, postgres
from tilepipe.services import stack as services_stack
from tilepipe.services.procs import stop

pytestmark = pytest.mark.xdist_group("services")
NO_PROXY = {"trust_env": False, "timeout": 30}


def _secrets(stack: services_stack.Stack) -> list[str]:
    return list(dataclasses.asdict(credentials.load(stack.home)).values())


def _psql(stack: services_stack.Stack, user: str, database: str, password: str | None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSFILE"] = os.devnull  # no ~/.pgpass: only what is given here
    if password is not None:
        env["PGPASSWORD"] = password
    cmd = [postgres.client("psql"), "-h", "127.0.0.1", "-p", str(stack.ports.postgres), "-U", user,
           "-d", database, "-w", "-tAc", "SELECT current_user"]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)


def _group_cmdlines(stack: services_stack.Stack) -> list[str]:
    """The command line of every process of the stack's process groups (what `ps` shows anyone)."""
    groups = {proc.pid for proc in stack.procs.values()}
    lines = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) in groups:
                    lines.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
            except (OSError, ProcessLookupError):
                continue
    return lines


def test_up_changes_no_permission_and_keeps_the_secrets_private(services):
    assert BEFORE_UP, "the services fixture records the folders before up"
    assert changed_folders(BEFORE_UP, folder_modes(services.home)) == []
    assert not (ROOT / "basic_auth.db").exists()  # the MLflow auth store stays in the stack's folder
    secret_file = credentials.path(services.home)
    assert secret_file.stat().st_mode & 0o777 == 0o600
    secrets = _secrets(services)
    assert len(set(secrets)) == len(secrets) and all(len(s) >= 20 for s in secrets)
    files = [services_stack.state_file(services.home), *(services.home / "logs").iterdir()]
    for path in files:
        text = path.read_text(errors="replace")
        assert not [s for s in secrets if s in text], f"a secret in {path}"
    running = services_stack.load(services.home)  # a server restarted by an earlier test: its new pid
    cmdlines = _group_cmdlines(running)
    assert len(cmdlines) >= 4
    assert not [line for line in cmdlines for s in secrets if s in line], "a secret on a command line"
    data = postgres.data_dir(services.home)
    if postgres.is_root():  # PostgreSQL runs as its own user, none of root's groups, data in its folder
        status = (Path("/proc") / str(running.procs["postgres"].pid) / "status").read_text()
        ids = {line.split(":")[0]: line.split()[1:] for line in status.splitlines()}
        pg = postgres.ensure_system_user()
        assert ids["Uid"][0] == str(pg.pw_uid) and ids["Gid"][0] == str(pg.pw_gid)
        assert ids["Groups"] in ([], [str(pg.pw_gid)])
        assert data.parent == postgres.SYSTEM_HOME and data.stat().st_uid == pg.pw_uid
        assert services.note().startswith("PostgreSQL runs as system user tilepipe-pg")
    else:
        assert data == services.home / "postgres" and services.note() == ""


def test_postgres_takes_only_each_role_password_on_its_own_database(services):
    creds = credentials.load(services.home)
    assert _psql(services, "postgres", "postgres", None).returncode != 0  # no password: refused
    wrong = _psql(services, "postgres", "postgres", "wrong")
    assert wrong.returncode != 0 and "password authentication failed" in wrong.stderr
    assert _psql(services, "mlflow", "mlflow", creds.prefect_db).returncode != 0  # another role's
    assert _psql(services, "postgres", "postgres", creds.postgres).stdout.strip() == "postgres"
    for role in postgres.DATABASES:
        password = getattr(creds, f"{role}_db")
        assert _psql(services, role, role, password).stdout.strip() == role
        other = next(d for d in postgres.DATABASES if d != role)
        denied = _psql(services, role, other, password)
        assert denied.returncode != 0 and "permission denied for database" in denied.stderr
    # TILEPIPE_DATABASE_URL, the export line, holds the superuser's password
    assert f"postgres:{creds.postgres}@" in services.env["TILEPIPE_DATABASE_URL"]


def _s3(stack, key_id: str, secret: str):
    return boto3.client("s3", endpoint_url=stack.env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                        aws_access_key_id=key_id, aws_secret_access_key=secret)  # fmt: skip


def _s3_error(client) -> str:
    with pytest.raises(ClientError) as refused:
        client.list_buckets()
    return refused.value.response["Error"]["Code"]


def test_s3_answers_signed_requests_with_the_key_only_and_keeps_it_across_a_restart(services):
    env = services.env
    endpoint = env["AWS_ENDPOINT_URL"]
    for path in ("/tilepipe-dvc", "/", "/moto-api/data.json", "/moto-api/reset"):
        assert httpx.get(f"{endpoint}{path}", **NO_PROXY).status_code == 403, path
    assert httpx.post(f"{endpoint}/moto-api/reset", **NO_PROXY).status_code == 403
    assert _s3_error(_s3(services, env["AWS_ACCESS_KEY_ID"], "wrong-secret")) == "SignatureDoesNotMatch"
    assert _s3_error(_s3(services, "TPNOSUCHKEY000000000", "x")) == "InvalidAccessKeyId"
    exported = _s3(services, env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])
    assert {b["Name"] for b in exported.list_buckets()["Buckets"]} >= set(parts.BUCKETS)
    exported.put_object(Bucket="tilepipe-scenes", Key="security/x.txt", Body=b"x")
    assert exported.get_object(Bucket="tilepipe-scenes", Key="security/x.txt")["Body"].read() == b"x"
    # moto checks header signatures only: a presigned URL is refused at once (not a 500 to retry)
    link = exported.generate_presigned_url(
        "get_object", Params={"Bucket": "tilepipe-scenes", "Key": "security/x.txt"}
    )
    assert httpx.get(link, **NO_PROXY).status_code == 403

    stop(services_stack.load(services.home).procs["s3"])  # moto forgets everything: keys, buckets
    _, started = services_stack.up(services.home)
    assert started == ["s3"]
    assert services.env == env, "the same exported variables after a restart"
    assert {b["Name"] for b in exported.list_buckets()["Buckets"]} >= set(parts.BUCKETS)


def test_mlflow_refuses_anonymous_and_wrong_passwords(services):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    env = services.env
    url = f"{env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search?max_results=1"
    for auth in (
        None,
        ("admin", "password1234"),
        ("admin", "wrong"),
        ("nobody", env["MLFLOW_TRACKING_PASSWORD"]),
    ):
        assert httpx.get(url, auth=auth, **NO_PROXY).status_code == 401, auth
    good = ("admin", env["MLFLOW_TRACKING_PASSWORD"])
    assert httpx.get(url, auth=good, **NO_PROXY).status_code == 200
    assert httpx.get(f"{env['MLFLOW_TRACKING_URI']}/health", **NO_PROXY).status_code == 200  # probes only
    with stack_env(services):
        os.environ["MLFLOW_TRACKING_PASSWORD"] = "wrong"
        with pytest.raises(MlflowException, match="401|auth"):
            MlflowClient().search_experiments()
        os.environ["MLFLOW_TRACKING_PASSWORD"] = env["MLFLOW_TRACKING_PASSWORD"]
        assert MlflowClient().search_experiments() is not None


def test_prefect_refuses_anonymous_and_wrong_auth_strings(services, monkeypatch):
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    from tilepipe.flows.settings import check_api

    env = services.env
    url = env["PREFECT_API_URL"]
    user, password = env["PREFECT_API_AUTH_STRING"].split(":", 1)
    for auth in (None, (user, "wrong"), ("admin", password)):
        assert httpx.post(f"{url}/flows/filter", json={}, auth=auth, **NO_PROXY).status_code == 401, auth
    assert httpx.post(f"{url}/flows/filter", json={}, auth=(user, password), **NO_PROXY).status_code == 200
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_API_AUTH_STRING: f"{user}:wrong"}):
        with pytest.raises(TilepipeError, match=r"refused PREFECT_API_AUTH_STRING \(HTTP 401\)$") as refused:
            check_api()
        assert "wrong" not in str(refused.value)
    with temporary_settings(
        updates={PREFECT_API_URL: url, PREFECT_API_AUTH_STRING: env["PREFECT_API_AUTH_STRING"]}
    ):
        assert check_api() == url
