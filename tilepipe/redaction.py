"""Secrets out of everything tilepipe shows: one function for every URI it prints or records.

Every URI printed, logged, tagged, written to a file or published (tracking URIs, database URLs,
scene URIs, DVC remotes, endpoints) goes through :func:`redact`.

:func:`redact` keeps the scheme, host, port and path of a URI and drops the user info (user name,
password, token), the query string (presigned signatures, ``?token=``) and the fragment. It never
raises: a malformed URI comes out redacted too, and a local path is returned as it is.
:func:`redact_text` does the same for every URI inside a message (an exception's text).
"""

from __future__ import annotations

import re
from pathlib import Path

SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")


def redact(uri: str | Path) -> str:
    """``scheme://host[:port]/path`` of ``uri``: no user info, password, token, query or fragment.

    IPv6 hosts keep their brackets. A password holding an unescaped ``/`` (which SQLAlchemy
    accepts) is dropped whole: user info is everything up to the last ``@`` when what comes
    before it has no ``/`` or has ``:`` in its first segment (``user:pa/ss@host``).
    """
    text = str(uri)
    found = SCHEME.match(text)
    if found is None:
        return text  # a local path, models:/NAME@ALIAS, runs:/ID: nothing secret in the form
    rest = re.split(r"[?#]", text[found.end() :], maxsplit=1)[0]
    if "@" in rest:
        at = rest.rindex("@")
        before = rest[:at]
        if "/" not in before or ":" in before.split("/", 1)[0]:
            rest = rest[at + 1 :]
    host, slash, path = rest.partition("/")
    if "@" in host:
        host = host.rsplit("@", 1)[1]
    return f"{found.group(0)}{host}{slash}{path}"


def redact_text(text: object) -> str:
    """``text`` with every URI in it redacted (:func:`redact`)."""
    return URI_IN_TEXT.sub(lambda found: redact(found.group(0)), str(text))
