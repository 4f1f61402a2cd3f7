"""The stack's secrets: generated at the first ``up``, kept in ``<home>/credentials.json`` (mode 600).

They are never printed, except in the ``export`` lines that ``tilepipe services up`` prints for
the user to eval; the servers get theirs in their environment (which only their user and root
can read), never on a command line (which every local user sees in ``ps``).
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from tilepipe.errors import TilepipeError
from tilepipe.fsutil import write_text

FILE = "credentials.json"
SECRET_MODE = 0o600
MLFLOW_ADMIN = "admin"  # the MLflow basic-auth app's admin user
PREFECT_USER = "tilepipe"  # the user half of Prefect's "user:password" auth string
KEY_ALPHABET = string.ascii_uppercase + string.digits


@dataclass(frozen=True)
class Credentials:
    """One password per server and role; url-safe, so they go into URLs and SQL unescaped."""

    postgres: str  # the PostgreSQL superuser ``postgres`` (databases and roles at ``up``)
    mlflow_db: str  # the PostgreSQL role ``mlflow``, owner of database ``mlflow``
    prefect_db: str  # the PostgreSQL role ``prefect``, owner of database ``prefect``
    mlflow_admin: str  # the MLflow tracking server's admin
    mlflow_flask_key: str  # the MLflow auth app's CSRF key (MLFLOW_FLASK_SERVER_SECRET_KEY)
    prefect_api: str  # the Prefect server's API (PREFECT_SERVER_API_AUTH_STRING)
    s3_key_id: str  # the S3 server's one access key
    s3_secret: str

    @property
    def prefect_auth(self) -> str:
        """The ``user:password`` string the Prefect server and its clients share."""
        return f"{PREFECT_USER}:{self.prefect_api}"


def generate() -> Credentials:
    """Fresh random credentials (``secrets``: 32 bytes each, an AWS-shaped S3 key)."""
    passwords = {f.name: secrets.token_urlsafe(32) for f in fields(Credentials)}
    passwords["s3_key_id"] = "TP" + "".join(secrets.choice(KEY_ALPHABET) for _ in range(18))
    passwords["s3_secret"] = secrets.token_urlsafe(30)
    return Credentials(**passwords)


def path(home: Path) -> Path:
    """Where the stack of ``home`` keeps its credentials."""
    return home / FILE


def load(home: Path) -> Credentials | None:
    """The credentials of ``home``'s stack (None before its first ``up``)."""
    where = path(home)
    if not where.is_file():
        return None
    try:
        return Credentials(**json.loads(where.read_text()))
    except (ValueError, TypeError) as exc:
        raise TilepipeError(
            f"{where}: not a services credentials file ({type(exc).__name__}); "
            "stop the stack, remove the folder and run up again"
        ) from None


def load_or_create(home: Path) -> tuple[Credentials, bool]:
    """The credentials of ``home``, made and written (mode 600) if it has none; True if just made."""
    found = load(home)
    if found is not None:
        return found, False
    made = generate()
    write_text(path(home), json.dumps(asdict(made), indent=1) + "\n", mode=SECRET_MODE)
    return made, True
