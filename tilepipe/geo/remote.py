"""Scenes in object storage or on a web server: ``s3://bucket/key.tif`` and ``https://host/path.tif``.

Rasters are read through GDAL's virtual file systems (/vsis3/, /vsicurl/) with windowed range
requests: a scene is never downloaded whole. Credentials and the endpoint come from the usual AWS
variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_S3_ENDPOINT`` or
``AWS_ENDPOINT_URL``, ``AWS_HTTPS``, ``AWS_VIRTUAL_HOSTING``), never from params, and never appear
in a message: a URI is shown without user info or query string (:func:`tilepipe.redaction.redact`).

A remote file's fingerprint is what the store guarantees about its content without reading it:
the ETag, the size and the last-modified time the server sends (docs/team-setup.md).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from tilepipe.errors import TilepipeError
from tilepipe.redaction import redact, redact_text

REMOTE_SCHEMES = ("s3://", "http://", "https://")
TIMEOUT_S = 20.0
RETRIES = 3
# What GDAL, curl, S3 and web servers say when a request failed on the way (a retry can help), by
# kind, first match wins; lower case. Damaged bytes say none of this: a retry reads them again.
NETWORK_FAULTS = (
    ("throttled", ("http response code: 429", "http error code: 429", "reduce your request rate",
                   "slowdown", "too many requests", "toomanyrequests", "throttl", "requestlimitexceeded")),
    ("server-error", ("http response code: 5", "http error code: 5", "service unavailable",
                      "serviceunavailable", "internal error", "bad gateway")),
    ("timeout", ("timed out", "timeout")),
    ("connection", ("curl error", "connection reset", "connection refused", "could not connect",
                    "failed to connect", "could not resolve host", "temporary failure")),
)  # fmt: skip
BUSY_S3_CODES = {"429", "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                 "TooManyRequests", "500", "502", "503", "504", "InternalError",
                 "ServiceUnavailable"}  # fmt: skip


class StoreUnavailable(TilepipeError, OSError):  # noqa: N818 - it reads as what happened
    """The store or server cannot serve the request now (refused, timed out, throttled, 5xx).

    One line for the CLI (a :class:`TilepipeError`), and a fault a retry can help: the flow
    retries a scene that fails with it (``tilepipe.geo.read_errors.failure_kind``).
    """


def network_fault(exc: BaseException) -> str | None:
    """The kind of fault on the way that ``exc`` or its causes report (``NETWORK_FAULTS``), or None."""
    chain, seen = [], exc
    while seen is not None and len(chain) < 10:  # rasterio chains GDAL's own messages as causes
        chain.append(str(seen).lower())
        seen = seen.__cause__ or seen.__context__
    for kind, needles in NETWORK_FAULTS:
        if any(needle in text for text in chain for needle in needles):
            return kind
    return None


def is_remote(location: str | Path) -> bool:
    """True for an ``s3://``, ``http://`` or ``https://`` URI (a local path is never one)."""
    return isinstance(location, str) and location.startswith(REMOTE_SCHEMES)


def as_location(text: str | Path) -> str | Path:
    """A catalog or record entry as what the readers take: the URI string when remote, else a Path."""
    return text if is_remote(text) else Path(text)


def beside(base: Path, text: str) -> str | Path:
    """A catalog entry: a URI as it is, a relative path resolved against the catalog's folder."""
    return text if is_remote(text) else base / text


shown = redact  # the name this module gave it first: one function, tilepipe.redaction.redact


def check_remote(uri: str) -> None:
    """A malformed remote URI (``s3:///key.tif``, ``https:///x``, a broken IPv6 host) is one line."""
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise TilepipeError(f"{redact(uri)}: not a valid URI ({exc})") from None
    if not parts.hostname:
        what = "no bucket" if parts.scheme == "s3" else "no host"
        raise TilepipeError(f"{redact(uri)}: not a valid {parts.scheme}:// URI ({what})")


def s3_endpoint_url() -> str | None:
    """The S3 endpoint as boto3 takes it, from ``AWS_ENDPOINT_URL`` or GDAL's ``AWS_S3_ENDPOINT``."""
    if url := os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"):
        return url
    if host := os.environ.get("AWS_S3_ENDPOINT"):
        scheme = "http" if os.environ.get("AWS_HTTPS", "YES").upper() in ("NO", "FALSE", "0") else "https"
        return host if "://" in host else f"{scheme}://{host}"
    return None


def gdal_cloud_options() -> dict[str, str]:
    """GDAL settings for cloud reads (docs/team-setup.md gives the reason for each)."""
    options = {
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",  # no LIST of the bucket folder on every open
        "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF,.vrt,.jp2,.geojson,.json,.ovr,.msk",
        # a reset, a 429 or a 5xx mid-read is retried with a growing delay from 1 s; the variables
        # of the same names, when set, win (a test or an impatient user sets fewer retries)
        "GDAL_HTTP_MAX_RETRY": os.environ.get("GDAL_HTTP_MAX_RETRY", "5"),
        "GDAL_HTTP_RETRY_DELAY": os.environ.get("GDAL_HTTP_RETRY_DELAY", "1"),
        "GDAL_HTTP_TIMEOUT": os.environ.get("GDAL_HTTP_TIMEOUT", "60"),
        "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",  # one request for adjacent tiles of a window
    }
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and not os.environ.get("AWS_S3_ENDPOINT"):  # GDAL knows only AWS_S3_ENDPOINT
        parts = urlsplit(endpoint)
        options["AWS_S3_ENDPOINT"] = parts.netloc
        options["AWS_HTTPS"] = "YES" if parts.scheme == "https" else "NO"
        options.setdefault("AWS_VIRTUAL_HOSTING", os.environ.get("AWS_VIRTUAL_HOSTING", "FALSE"))
    return options


@dataclass(frozen=True)
class RemoteStat:
    """What a HEAD request tells about an object."""

    size: int
    etag: str
    modified: str

    @property
    def fingerprint(self) -> str:
        """Stands for the content in ``scenes.json`` where a local file has its SHA-256."""
        return f"etag:{self.etag};size:{self.size};modified:{self.modified}"


_CLIENTS: dict[tuple[str | None, ...], object] = {}
_CLIENTS_LOCK = threading.Lock()
CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def s3_client():
    """A boto3 S3 client for the endpoint and credentials of the environment now (timeouts, retries).

    Not boto3's default session: it keeps the credentials it found first for the life of the
    process, so a key changed in the environment since (rotated, another store) would be refused.
    One client per endpoint and credentials, shared (boto3 clients are thread-safe).
    """
    key = (s3_endpoint_url(), *(os.environ.get(name) for name in CREDENTIAL_VARIABLES))
    with _CLIENTS_LOCK:
        if key not in _CLIENTS:
            import boto3
            from botocore.config import Config

            timeouts = {"connect_timeout": TIMEOUT_S, "read_timeout": TIMEOUT_S}
            config = Config(**timeouts, retries={"max_attempts": RETRIES})
            _CLIENTS[key] = boto3.session.Session().client("s3", endpoint_url=key[0], config=config)
        return _CLIENTS[key]


def s3_call(uri: str, call: str, **extra):
    """Run an S3 request on the object of ``uri``; any failure is one line naming the URI."""
    check_remote(uri)
    parts = urlsplit(uri)
    client = s3_client()
    with s3_errors(uri, client):
        return getattr(client, call)(Bucket=parts.netloc, Key=parts.path.lstrip("/"), **extra)


@contextmanager
def s3_errors(uri: str, client) -> Iterator[None]:
    """Turn a failed S3 request about ``uri`` into one line naming it (never the credentials).

    A store that does not answer, times out, throttles or fails (5xx) after boto3's own retries
    raises :class:`StoreUnavailable`; a missing object or a denied key, a plain TilepipeError.
    """
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        EndpointConnectionError,
        HTTPClientError,
        NoCredentialsError,
    )
    from botocore.exceptions import ConnectionError as BotoConnectionError

    try:
        yield
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in BUSY_S3_CODES:
            raise StoreUnavailable(f"{shown(uri)}: the store is busy (S3 error {code})") from None
        if code in ("404", "NoSuchKey") and not _bucket_exists(client, urlsplit(uri).netloc):
            code = "NoSuchBucket"  # a HEAD answer has no body to say which is missing
        problem = {
            "404": "object not found", "NoSuchKey": "object not found", "NoSuchBucket": "bucket not found",
            "403": "access denied (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)",
            "AccessDenied": "access denied (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)",
        }.get(code, f"S3 error {code}")  # fmt: skip
        raise TilepipeError(f"{redact(uri)}: {problem}") from None
    except EndpointConnectionError:
        raise StoreUnavailable(
            f"{redact(uri)}: the S3 endpoint {redact(s3_endpoint_url() or 'AWS')} does not answer"
        ) from None
    except (BotoConnectionError, HTTPClientError) as exc:  # timeouts, resets, closed connections
        what = type(exc).__name__
        raise StoreUnavailable(f"{shown(uri)}: the S3 endpoint failed on the way ({what})") from None
    except NoCredentialsError:
        raise TilepipeError(
            f"{redact(uri)}: no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
        ) from None
    except BotoCoreError as exc:
        raise TilepipeError(f"{redact(uri)}: {type(exc).__name__}: {redact_text(exc)}") from None


def _bucket_exists(client, bucket: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        return str(exc.response.get("Error", {}).get("Code", "")) not in ("404", "NoSuchBucket")
    return True


def _http(uri: str, headers: dict[str, str] | None = None):
    """GET ``uri`` (a HEAD would break a presigned GET link's signature)."""
    import httpx

    check_remote(uri)
    try:
        with httpx.Client(transport=httpx.HTTPTransport(retries=RETRIES), timeout=TIMEOUT_S) as client:
            response = client.get(uri, headers=headers, follow_redirects=True)
    except httpx.TransportError as exc:  # refused, reset, timed out
        raise StoreUnavailable(f"{shown(uri)}: the server does not answer ({type(exc).__name__})") from None
    except httpx.HTTPError as exc:
        raise TilepipeError(f"{redact(uri)}: the server does not answer ({type(exc).__name__})") from None
    if response.status_code == 429 or response.status_code >= 500:
        raise StoreUnavailable(f"{redact(uri)}: HTTP {response.status_code}: the server is busy; retry later")
    if response.status_code >= 400:
        what = {404: "not found", 403: "access denied", 401: "access denied"}.get(response.status_code, "")
        raise TilepipeError(f"{redact(uri)}: HTTP {response.status_code} {what}".rstrip())
    return response


def remote_stat(uri: str) -> RemoteStat:
    """Size, ETag and last-modified of a remote object, or one line saying why it cannot be read."""
    if uri.startswith("s3://"):
        head = s3_call(uri, "head_object")
        return RemoteStat(int(head["ContentLength"]), head.get("ETag", "").strip('"'),
                          head["LastModified"].isoformat())  # fmt: skip
    headers = _http(uri, {"Range": "bytes=0-0"}).headers  # the first byte only
    size = headers.get("content-range", "").rpartition("/")[2] or headers.get("content-length", "-1")
    return RemoteStat(int(size) if size.isdigit() else -1, headers.get("etag", "").strip('"'),
                      headers.get("last-modified", ""))  # fmt: skip


def read_remote_bytes(uri: str) -> bytes:
    """A small remote file whole (GeoJSON labels; rasters are read by window through GDAL)."""
    if uri.startswith("s3://"):
        return s3_call(uri, "get_object")["Body"].read()
    return _http(uri).content
