"""Failures classified: a fault on the way (a retry can help) or not (bad input, damaged data, full disk)."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from rasterio.errors import RasterioError
from rasterio.windows import Window

from tilepipe.errors import TilepipeError, bad_file
from tilepipe.geo.remote import StoreUnavailable, network_fault, remote_stat

__all__ = ["StoreUnavailable", "failure_kind", "is_retryable", "is_transient_read_error"]

T = TypeVar("T")


def describe_error(exc: BaseException) -> str:
    """First line of a library error, for one-line messages.

    rasterio's "Read failed. See previous exception for details." hides GDAL's reason in the
    chained exceptions: the first of those that names the file and block is used instead.
    """
    if isinstance(exc, TilepipeError):
        return str(exc)
    text = str(exc).split("\n")[0]
    cause = exc.__cause__ or exc.__context__
    if "See previous exception" in text and cause is not None:
        return describe_error(cause)
    return text


# The kinds of failure, and whether a retry can help (docs/orchestration.md has the table).
RETRIED = ("store-unavailable", "throttled", "server-error", "timeout", "connection", "io-error")
NOT_RETRIED = ("bad-input", "permission-denied", "read-only", "not-found", "no-space", "damaged-data",
               "os-error", "bug")  # fmt: skip
ERRNO_KINDS = {
    errno.ETIMEDOUT: "timeout",
    **dict.fromkeys((errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.ENETDOWN,
                     errno.ENETUNREACH, errno.ENETRESET, errno.EHOSTDOWN, errno.EHOSTUNREACH), "connection"),
    errno.EIO: "io-error",  # a network mount or a disk that hiccuped; a dead disk fails 4 times
    **dict.fromkeys((errno.EACCES, errno.EPERM), "permission-denied"),
    errno.EROFS: "read-only",
    **dict.fromkeys((errno.ENOENT, errno.ENOTDIR), "not-found"),
    **dict.fromkeys((errno.ENOSPC, errno.EDQUOT, errno.EFBIG), "no-space"),
}  # fmt: skip
# GDAL's words for a file it cannot find or may not read (after the faults on the way).
GDAL_KINDS = (
    ("not-found", ("no such file", "does not exist", "http response code: 404", "http error code: 404")),
    ("permission-denied", ("permission denied", "access denied", "http response code: 403")),
)


def failure_kind(exc: BaseException) -> str:
    """What went wrong, as one of ``RETRIED`` (a retry can help) or ``NOT_RETRIED`` (it cannot).

    By type: :class:`StoreUnavailable` (a store that does not answer now); any other TilepipeError
    (bad input: params, catalog, damaged pixels, named in one line); a GDAL error by its words
    (``remote.NETWORK_FAULTS``, a missing or forbidden file, else damaged data); a client library's
    timeout or connection error by its class name; an OSError by its errno; anything else is a bug.
    """
    if isinstance(exc, StoreUnavailable):
        return "store-unavailable"
    if isinstance(exc, TilepipeError):
        return "bad-input"
    if isinstance(exc, RasterioError):  # before OSError: RasterioIOError is one, without an errno
        text = describe_error(exc).lower()
        said = next((kind for kind, words in GDAL_KINDS if any(w in text for w in words)), None)
        return network_fault(exc) or said or "damaged-data"
    names = " ".join(cls.__name__ for cls in type(exc).__mro__)  # httpx, botocore, urllib3 alike
    if isinstance(exc, TimeoutError) or "Timeout" in names:
        return "timeout"
    if isinstance(exc, ConnectionError) or "ConnectError" in names or "ConnectionError" in names:
        return "connection"
    if isinstance(exc, OSError):
        return ERRNO_KINDS.get(exc.errno, "os-error")
    return "bug"


def is_retryable(exc: BaseException) -> bool:
    """True when a retry can help: a fault on the way, never bad input, a full disk or a bug."""
    return failure_kind(exc) in RETRIED


def is_transient_read_error(exc: BaseException) -> bool:
    """True for a read that failed on the way (network, server, throttling), False for damaged data."""
    return network_fault(exc) is not None


class ReadInterrupted(StoreUnavailable):
    """A read that failed on the way (network, server): one line for a user, and a retry can help."""


def read_remote_again(location: str, exc: RasterioError, read: Callable[[], T]) -> T:
    """After GDAL failed to read part of a remote file (its own HTTP retries spent), ask the store.

    It does not answer: :class:`StoreUnavailable` (the flow retries the scene). It does: read once
    more, since the outage may have just ended; a second failure is the file's own and is raised.
    """
    try:
        remote_stat(location)
    except TilepipeError as down:
        raise StoreUnavailable(f"{down} (while reading: {describe_error(exc)})") from None
    return read()


def unreadable_window(path: Path | str, window: Window, exc: RasterioError, scene_id: str) -> TilepipeError:
    """One line for pixels that cannot be decoded: the file, its scene, the window, GDAL's reason."""
    rows = f"{int(window.row_off)}-{int(window.row_off + window.height) - 1}"
    cols = f"{int(window.col_off)}-{int(window.col_off + window.width) - 1}"
    problem = f"damaged data: rows {rows}, columns {cols} cannot be read ({describe_error(exc)})"
    return bad_file(path, f"scene {scene_id}: {problem}")
