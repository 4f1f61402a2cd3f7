"""A real S3-compatible server for the object-storage tests: moto's server on 127.0.0.1, once per session.

A pytest plugin (conftest.py's ``pytest_plugins``): the ``s3`` fixture starts ``moto_server`` on a
free port and sets the AWS variables a user would (endpoint, credentials) for the session. The
server checks request signatures (moto's IAM authentication): the first three requests create a
user, its access key and its policy; every request after them needs that key.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.prefect_server import free_port
from tilepipe.processes import environment

BIN = Path(sys.executable).parent
SETUP_REQUESTS = 3  # unauthenticated: create the user, its key and its policy
ALLOW_ALL = '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}'


@dataclass
class S3Server:
    """A moto server process; ``stop``/``start`` restart it on the same port (its data is lost)."""

    port: int
    log: Path
    proc: subprocess.Popen | None = field(default=None)
    credentials: dict[str, str] = field(default_factory=dict)
    auth: bool = True  # False: any key is accepted (a server restarted on the same port keeps working)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The variables a user sets to reach this store (boto3, GDAL and DVC read them)."""
        return {**self.credentials, "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self) -> None:
        cmd = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)]
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_REQUESTS)} if self.auth else None
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"moto_server exited: {self.log.read_text()[-3000:]}")
            try:
                httpx.get(f"{self.endpoint}/moto-api/", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            pytest.fail(f"moto_server did not answer on {self.endpoint}")
        if self.auth:
            self._create_user()
        else:
            self.credentials = {"AWS_ACCESS_KEY_ID": "any", "AWS_SECRET_ACCESS_KEY": "any-secret"}

    def _create_user(self) -> None:
        import boto3

        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1",
                           aws_access_key_id="setup", aws_secret_access_key="setup")  # fmt: skip
        iam.create_user(UserName="tilepipe")
        key = iam.create_access_key(UserName="tilepipe")["AccessKey"]
        iam.put_user_policy(UserName="tilepipe", PolicyName="all", PolicyDocument=ALLOW_ALL)
        self.credentials = {
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
        }

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.credentials["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.credentials["AWS_SECRET_ACCESS_KEY"])  # fmt: skip


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> Iterator[S3Server]:
    """One moto S3 server for the session, with the AWS variables set in this process's environment."""
    server = S3Server(free_port(), tmp_path_factory.mktemp("s3") / "moto.log")
    server.start()
    try:
        with environment(server.env()):
            yield server
    finally:
        server.stop()
