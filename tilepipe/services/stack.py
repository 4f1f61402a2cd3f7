"""`tilepipe services up|down|status`: the stack under one folder (default ``.services/``).

``state.json`` records each server's pid, start time, port, URL and log; ``credentials.json``
(mode 600, made at the first ``up``) every server's password. ``up`` keeps the servers that
still run and starts the others (on their recorded ports, with the same credentials, so exported
variables stay valid): twice in a row it starts nothing. ``down`` stops exactly the recorded
processes. A lock file keeps two ``up``/``down`` from interleaving. Nothing outside the folder is
written or has its permissions changed, except, as root, PostgreSQL's user and folder
(:mod:`.postgres`).
"""

from __future__ import annotations

import fcntl
import json
import shlex
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tilepipe.errors import TilepipeError
from tilepipe.fsutil import write_json
from tilepipe.services import credentials, parts, postgres
from tilepipe.services.procs import Proc, alive, free_port, port_taken, spawn, start_time, stop, wait_ready

DEFAULT_HOME = Path(".services")
ORDER = ("postgres", "s3", "mlflow", "prefect")  # start order; stopped in reverse
START_TIMEOUT_S = {"postgres": 60.0, "s3": 60.0, "mlflow": 180.0, "prefect": 180.0}  # busy 2-core machine


@dataclass
class Stack:
    """The stack in one folder: its ports and running servers, as ``state.json`` records them."""

    home: Path
    ports: parts.Ports
    procs: dict[str, Proc] = field(default_factory=dict)
    pg_user: str | None = None  # the system user PostgreSQL runs as (root only), else this process's
    pg_data: str = ""  # PostgreSQL's data folder

    @property
    def env(self) -> dict[str, str]:
        """The variables that point MLflow, Prefect, boto3, DVC and GDAL at this stack, credentials too."""
        found = credentials.load(self.home)
        if found is None:
            raise TilepipeError(f"services: no credentials in {self.home} (run `tilepipe services up`)")
        return parts.client_env(self.ports, found)

    def exports(self) -> str:
        """Shell ``export`` lines for :attr:`env` (the one place the credentials are printed)."""
        return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in self.env.items())

    def note(self) -> str:
        """What ``up`` says about PostgreSQL's user and data when it needs a user of its own (root)."""
        if self.pg_user is None:
            return ""
        return f"PostgreSQL runs as system user {self.pg_user} (run as root), data in {self.pg_data}"


def state_file(home: Path) -> Path:
    """Where the stack of ``home`` is recorded."""
    return home / "state.json"


def load(home: Path) -> Stack | None:
    """The recorded stack of ``home`` (None if there is none)."""
    path = state_file(home)
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        ports = parts.Ports(**raw["ports"])
        procs = {name: Proc(**rec) for name, rec in raw["procs"].items()}
        pg = raw.get("postgres", {})
    except (ValueError, KeyError, TypeError) as exc:
        raise TilepipeError(f"{path}: not a services state file ({exc}); remove it and rerun") from None
    return Stack(home.resolve(), ports, procs, pg.get("user"), pg.get("data", ""))


def save(stack: Stack) -> None:
    """Record the stack (atomically: a reader sees the old or the new state)."""
    write_json(
        state_file(stack.home),
        {
            "ports": vars(stack.ports),
            "procs": {n: p.to_dict() for n, p in stack.procs.items()},
            "postgres": {"user": stack.pg_user, "data": stack.pg_data},
        },
    )


@contextmanager
def locked(home: Path) -> Iterator[None]:
    """Hold ``home/.lock`` (one ``up`` or ``down`` at a time on a folder; made private if new)."""
    home.parent.mkdir(parents=True, exist_ok=True)
    home.mkdir(mode=0o700, exist_ok=True)
    with open(home / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _launch(stack: Stack, name: str, argv: list[str], env: dict, user: str | None = None) -> Proc:
    """Start one server and record it (the state is saved at once: ``down`` can stop it)."""
    log = stack.home / "logs" / f"{name}.log"
    port = getattr(stack.ports, name)
    if port_taken(port):
        raise TilepipeError(f"services: port {port} for {name} is taken by another process; run down, up")
    pid = spawn(name, argv, env, log, user, cwd=Path(stack.pg_data) if user else stack.home)
    stop_signal = "SIGINT" if name == "postgres" else "SIGTERM"  # PostgreSQL's fast shutdown
    proc = Proc(name, pid, start_time(pid), port, parts.urls(stack.ports)[name], str(log), stop_signal)
    stack.procs[name] = proc
    save(stack)
    return proc


def _ready(stack: Stack, name: str, check: Callable[[], bool]) -> None:
    proc = stack.procs[name]
    wait_ready(name, proc.pid, check, Path(proc.log), START_TIMEOUT_S[name])


def _start_base(stack: Stack, creds: credentials.Credentials, missing: set[str]) -> None:
    """PostgreSQL (with the two databases and their roles) and the S3 server (with the buckets)."""
    ports = stack.ports
    if "postgres" in missing:
        logs = stack.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        where = postgres.place(stack.home)
        postgres.init(where, creds.postgres, logs / "postgres.log")
        _launch(stack, "postgres", postgres.argv(where, ports.postgres), parts.base_env(), where.user)
    if "s3" in missing:
        _launch(stack, "s3", parts.s3_argv(ports.s3), parts.s3_server_env(ports, creds))
    if "postgres" in missing:
        _ready(stack, "postgres", lambda: postgres.ready(ports.postgres))
    postgres.create_databases(ports.postgres, creds)
    if "s3" in missing:
        _ready(stack, "s3", lambda: parts.s3_ready(ports.s3))
    parts.s3_create_buckets(ports, creds)


def _start_servers(stack: Stack, creds: credentials.Credentials, missing: set[str]) -> None:
    """The MLflow and Prefect servers, started together and waited for together."""
    ports = stack.ports
    checks = {}
    if "mlflow" in missing:
        _launch(stack, "mlflow", parts.mlflow_argv(ports), parts.mlflow_env(ports, creds, stack.home))
        checks["mlflow"] = lambda: parts.mlflow_ready(ports)
    if "prefect" in missing:
        home = stack.home / "prefect"
        home.mkdir(parents=True, exist_ok=True)
        _launch(stack, "prefect", parts.prefect_argv(ports), parts.prefect_env(ports, creds, home))
        checks["prefect"] = lambda: parts.prefect_ready(ports)
    with ThreadPoolExecutor(max(1, len(checks))) as pool:
        for future in [pool.submit(_ready, stack, name, check) for name, check in checks.items()]:
            future.result()


def up(home: Path = DEFAULT_HOME) -> tuple[Stack, list[str]]:
    """Start the servers of ``home``'s stack that do not run; returns it and the names started."""
    home = home.resolve()
    with locked(home):
        stack = load(home)
        if stack is None:
            stack = Stack(home, parts.Ports(*(free_port() for _ in ORDER)))
        missing = {name for name in ORDER if name not in stack.procs or not alive(stack.procs[name])}
        if not missing:
            return stack, []
        creds = _credentials(home)
        stack.pg_user = postgres.SYSTEM_USER if postgres.is_root() else None
        stack.pg_data = str(postgres.data_dir(home))
        for name in missing:
            stack.procs.pop(name, None)
        save(stack)
        try:
            _start_base(stack, creds, missing)
            _start_servers(stack, creds, missing)
        except BaseException:
            for name in reversed(ORDER):  # what this call started, nothing that ran before
                if name in missing and name in stack.procs:
                    stop(stack.procs.pop(name))
            save(stack)
            raise
    return stack, [name for name in ORDER if name in missing]


def _credentials(home: Path) -> credentials.Credentials:
    """The stack's credentials, made at its first ``up``; a cluster made without them is refused."""
    creds, made = credentials.load_or_create(home)
    data = postgres.data_dir(home)
    if made and (data / "PG_VERSION").is_file():
        credentials.path(home).unlink()
        raise TilepipeError(
            f"services: the PostgreSQL data in {data} was made without the credentials of "
            f"{credentials.path(home)} (by an older tilepipe, or that file was removed): "
            "remove that data folder (its MLflow runs and Prefect flow runs) and run up again"
        )
    return creds


def down(home: Path = DEFAULT_HOME) -> list[str]:
    """Stop exactly the recorded processes, last started first; returns the names that were running."""
    home = home.resolve()
    with locked(home):
        stack = load(home)
        if stack is None:
            return []
        stopped = [name for name in reversed(ORDER) if name in stack.procs and stop(stack.procs[name])]
        state_file(home).unlink()
    return stopped


def status(home: Path = DEFAULT_HOME) -> list[tuple[str, str, str]]:
    """Each recorded server: name, URL and "answers" / "running, not answering" / "not running"."""
    stack = load(home.resolve())
    if stack is None:
        return []
    checks = {
        "postgres": lambda p: postgres.ready(p.postgres),
        "s3": lambda p: parts.s3_ready(p.s3),
        "mlflow": parts.mlflow_ready,
        "prefect": parts.prefect_ready,
    }
    rows = []
    for name in ORDER:
        proc = stack.procs.get(name)
        if proc is None or not alive(proc):
            state = "not running"
        else:
            state = "answers" if checks[name](stack.ports) else "running, not answering"
        rows.append((name, parts.urls(stack.ports)[name], state))
    return rows
