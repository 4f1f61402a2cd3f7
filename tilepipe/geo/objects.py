"""Objects under an ``s3://bucket/prefix/`` as files: list, read, write, delete, create only if absent.

The client, its endpoint and credentials are ``geo.remote``'s (the AWS variables); every failure is
one line naming the URI, never a key.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from tilepipe.geo.remote import RemoteStat, s3_call, s3_client, s3_errors


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b``)."""
    parts = urlsplit(uri)
    return parts.netloc, parts.path.lstrip("/")


def join(prefix: str, *names: str) -> str:
    """``join("s3://b/maps/", "s1", "s1.tif")`` -> ``s3://b/maps/s1/s1.tif``."""
    return "/".join([prefix.rstrip("/"), *names])


def list_objects(prefix: str) -> list[tuple[str, RemoteStat]]:
    """Every object under ``prefix`` (a folder: ``s3://bucket/prefix/``) as (URI, size / ETag / time).

    The time is the listing's Last-Modified to the second, as a HEAD request gives it, so the
    fingerprint is the one ``remote_stat`` computes for the same object.
    """
    bucket, key = split_uri(prefix)
    folder = key.rstrip("/") + "/" if key.strip("/") else ""
    client = s3_client()
    found = []
    with s3_errors(prefix, client):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder):
            for obj in page.get("Contents", []):
                stat = RemoteStat(int(obj["Size"]), obj.get("ETag", "").strip('"'),
                                  obj["LastModified"].replace(microsecond=0).isoformat())  # fmt: skip
                found.append((f"s3://{bucket}/{obj['Key']}", stat))
    return found


def read_object(uri: str) -> bytes | None:
    """The object's bytes, or None when there is no such object."""
    client = s3_client()
    bucket, key = split_uri(uri)
    with s3_errors(uri, client):
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except client.exceptions.NoSuchKey:
            return None


def write_object(uri: str, data: bytes, content_type: str = "application/octet-stream") -> None:
    """Write the object whole (a reader sees the old object or the new one, never part of one)."""
    s3_call(uri, "put_object", Body=data, ContentType=content_type)


def upload_file(path: Path, uri: str, content_type: str) -> None:
    """Upload a local file (multipart for big ones: the object appears only once every part is in)."""
    client = s3_client()
    bucket, key = split_uri(uri)
    with s3_errors(uri, client):
        client.upload_file(str(path), bucket, key, ExtraArgs={"ContentType": content_type})


def delete_object(uri: str) -> None:
    """Delete the object (nothing happens when it does not exist)."""
    s3_call(uri, "delete_object")


def create_object(uri: str, data: bytes) -> bool:
    """Create the object only if it does not exist (``If-None-Match: *``); False when it already does."""
    from botocore.exceptions import ClientError

    client = s3_client()
    bucket, key = split_uri(uri)
    with s3_errors(uri, client):
        try:
            client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in ("PreconditionFailed", "412"):
                return False
            raise
    return True
