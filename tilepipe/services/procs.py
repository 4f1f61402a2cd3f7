"""Server processes: free ports, start in a process group with a log file, liveness, readiness, stop.

A process is recorded by its pid and its start time (from ``/proc``), so a pid reused by an
unrelated process after a reboot or a crash is never taken for the server, nor killed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from tilepipe.errors import TilepipeError

STOP_WAIT_S = 20.0  # how long a server gets to exit after its stop signal, before SIGKILL


@dataclass
class Proc:
    """A started server: what ``down`` needs to stop exactly it, and ``status`` to show it."""

    name: str
    pid: int
    started: str  # /proc start time of pid: together they name one process
    port: int
    url: str
    log: str
    stop_signal: str = "SIGTERM"

    def to_dict(self) -> dict:
        """The record as written in the state file."""
        return asdict(self)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_taken(port: int) -> bool:
    """True if something already listens on 127.0.0.1:port."""
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def start_time(pid: int) -> str:
    """The process's start time (clock ticks since boot, Linux), or "" if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return ""
        return "?"  # not Linux: the pid exists, its start time is unknown
    fields = stat.rsplit(")", 1)[1].split()
    return "" if fields[0] == "Z" else fields[19]  # a zombie has exited already


def alive(proc: Proc) -> bool:
    """True if the recorded process still runs (same pid, same start time)."""
    now = start_time(proc.pid)
    return bool(now) and (now == proc.started or "?" in (now, proc.started))


def spawn(
    name: str,
    argv: list[str],
    env: dict[str, str],
    log: Path,
    user: str | None = None,
    cwd: Path | None = None,
) -> int:
    """Start ``argv`` in its own process group (so a stop reaches its workers too), output to ``log``.

    ``cwd``: where it runs (the stack's folder: a file a server writes beside it stays there).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        out.flush()
        try:
            proc = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **as_user(user),
                cwd=cwd,
                close_fds=True,
            )
        except OSError as exc:
            raise TilepipeError(f"services: cannot start {name} ({argv[0]}): {exc.strerror}") from None
    return proc.pid


def as_user(user: str | None) -> dict:
    """``subprocess`` arguments that run a child as ``user``: its uid, its group, none of ours."""
    return {} if user is None else {"user": user, "group": user, "extra_groups": []}


def wait_ready(name: str, pid: int, ready: Callable[[], bool], log: Path, timeout: float) -> None:
    """Poll ``ready()`` until it holds; a process that exits or a timeout is one line naming the log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not start_time(pid):
            raise TilepipeError(f"services: {name} exited while starting; see its log {log}")
        _reap(pid)
        if ready():
            return
        time.sleep(0.3)
    raise TilepipeError(f"services: {name} did not answer within {timeout:.0f} s; see its log {log}")


def http_ok(url: str, timeout: float = 3.0) -> bool:
    """True if a GET of ``url`` answers 200 (no proxy: the servers are on this machine)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:  # noqa: S310 - http://127.0.0.1 only
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def http_answers(url: str, timeout: float = 3.0) -> bool:
    """True if an HTTP server answers a GET of ``url``, whatever the status (a 403 is an answer)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout):  # noqa: S310 - http://127.0.0.1 only
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _reap(pid: int) -> None:
    """Collect the exit status of our own child, so an exited server is not left as a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child (started by another `tilepipe services up`)


def stop(proc: Proc, wait_s: float = STOP_WAIT_S) -> bool:
    """Signal the recorded process's group, then SIGKILL it if it lingers; False if it was not running."""
    if not alive(proc):
        return False
    _signal_group(proc, getattr(signal, proc.stop_signal))
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and alive(proc):
        _reap(proc.pid)
        time.sleep(0.2)
    if alive(proc):
        _signal_group(proc, signal.SIGKILL)
    for _ in range(50):  # the leader, then any worker of its group that outlived it
        _reap(proc.pid)
        if not alive(proc) and not _group_left(proc.pid):
            break
        time.sleep(0.1)
    if _group_left(proc.pid):
        os.killpg(proc.pid, signal.SIGKILL)
    return True


def _group_left(pgid: int) -> bool:
    """True if a process of the group the server led is still there (its pgid is ours: setsid)."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _signal_group(proc: Proc, sig: int) -> None:
    """Signal the process group the server leads (started with a new session: pgid == pid)."""
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
    except ProcessLookupError:
        pass
