"""The one exception type for user mistakes: the CLI prints it as a single line, no traceback."""

from __future__ import annotations

from pathlib import Path

from tilepipe.redaction import redact


class TilepipeError(Exception):
    """A problem with the user's input (file, catalog or params), reported as one line."""


def bad_file(path: str | Path, problem: str) -> TilepipeError:
    """Build an error that names the file (a URI without its secrets) and what is wrong with it."""
    return TilepipeError(f"{redact(path)}: {problem}")
