"""Read errors: a fault on the way (a retry can help) or damaged data (it cannot), in one line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from rasterio.errors import RasterioError
from rasterio.windows import Window

from tilepipe.errors import TilepipeError, bad_file
from tilepipe.geo.remote import remote_stat

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


# What GDAL says when a remote read failed on the way (a retry can help), as opposed to a file
# whose bytes do not decode (a retry reads the same bytes and fails the same way).
TRANSIENT_READ = (
    "HTTP response code: 5",
    "HTTP error code: 5",
    "curl error",
    "Connection reset",
    "Connection refused",
    "timed out",
    "Timeout",
    "Temporary failure",
    "Could not resolve host",
)


def is_transient_read_error(exc: BaseException) -> bool:
    """True for a read that failed on the way (network, server), False for damaged or unreadable data."""
    chain, seen = [], exc
    while seen is not None and len(chain) < 10:  # rasterio chains GDAL's own messages as causes
        chain.append(str(seen).lower())
        seen = seen.__cause__ or seen.__context__
    return any(needle.lower() in text for text in chain for needle in TRANSIENT_READ)


class ReadInterrupted(TilepipeError):
    """A read that failed on the way (network, server): one line for a user, and a retry can help."""


class StoreUnavailable(OSError):  # noqa: N818 - it reads as what happened
    """A remote read failed and the store does not answer now: a retry of the scene can help."""


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
