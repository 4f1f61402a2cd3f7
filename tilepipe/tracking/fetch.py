"""Finding a logged model's run and fetching its weights file: MLflow only, no torch.

``tilepipe predict`` with ``models:/NAME@ALIAS`` (or a run) needs MLflow's registry and torch:
each takes about a second to import. ``Prefetch`` asks the registry and copies the weights in a
helper process (``python -m tilepipe.tracking.fetch``) while the command imports torch and opens
the scene, so the two seconds overlap on a machine with two cores.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tilepipe.errors import TilepipeError
from tilepipe.redaction import redact, redact_text
from tilepipe.tracking.store import no_login_in_links, tracking_uri

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
QUIET_MLFLOW = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
WEIGHTS = "weights/model.pt"  # the training's model.pt, logged as a run artifact (tracking/runs.py)


def is_mlflow_spec(spec: str | Path) -> bool:
    """True for ``models:/...``, ``runs:/...`` or a bare MLflow run id; False for a file path."""
    text = str(spec).strip()
    return text.startswith(("models:/", "runs:/")) or bool(RUN_ID.match(text))


def mlflow_client(spec: str) -> tuple[Any, Any, str]:
    """The ``mlflow`` module, a client of the tracking store, and the store's URI."""
    store = tracking_uri()
    if store.startswith("sqlite:///") and not Path(store.removeprefix("sqlite:///")).is_file():
        raise TilepipeError(
            f"{spec}: no MLflow store at {redact(store)} (train first, set MLFLOW_TRACKING_URI, "
            "or pass --model models/model.pt)"
        )
    import mlflow

    no_login_in_links(store)
    mlflow.set_tracking_uri(store)
    return mlflow, mlflow.MlflowClient(), store


@contextmanager
def quiet_downloads() -> Iterator[None]:
    """No download progress bars around the one summary line."""
    before = os.environ.get(QUIET_MLFLOW)
    os.environ[QUIET_MLFLOW] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(QUIET_MLFLOW, None)
        else:
            os.environ[QUIET_MLFLOW] = before


def spec_run(mlflow: Any, client: Any, spec: str) -> tuple[str, str]:
    """The run id behind a spec, and the URI of its logged MLflow model."""
    if spec.startswith("models:/"):
        return registry_run(mlflow, client, spec), spec
    if spec.startswith("runs:/"):
        return spec.split("/")[1], spec
    return client.get_run(spec).info.run_id, f"runs:/{spec}/model"


def registry_version(client: Any, spec: str) -> Any | None:
    """The registered version ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` names (None: other specs)."""
    rest = spec.removeprefix("models:/")
    if not spec.startswith("models:/"):
        return None
    if "@" in rest:
        return client.get_model_version_by_alias(*rest.split("@", 1))
    if "/" in rest:
        return client.get_model_version(*rest.split("/", 1))
    return None


def registry_run(mlflow: Any, client: Any, spec: str, version: Any | None = None) -> str:
    """The source run of a registered version: ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""
    from mlflow.exceptions import MlflowException

    version = version or registry_version(client, spec)
    if version is None:  # a logged model id (models:/m-...)
        return mlflow.get_logged_model(spec.removeprefix("models:/")).source_run_id
    run_id = version.run_id or version.tags.get("run_id")
    if not run_id and version.model_id:
        run_id = mlflow.get_logged_model(version.model_id).source_run_id
    if not run_id:
        raise MlflowException(f"version {version.version} of {version.name} has no source run")
    return run_id


def identify(mlflow: Any, client: Any, spec: str) -> dict[str, str | None]:
    """What a spec names: registered ``name`` and ``version`` (None for a run), ``run_id``, ``source``."""
    version = registry_version(client, spec)
    if spec.startswith("models:/"):
        run_id = registry_run(mlflow, client, spec, version)
    else:
        run_id = spec_run(mlflow, client, spec)[0]
    return {
        "name": version.name if version is not None else None,
        "version": str(version.version) if version is not None else None,
        "run_id": run_id,
        "source": spec,
    }


def download_weights(client: Any, run_id: str, folder: Path) -> Path | None:
    """Copy the run's ``weights/model.pt`` into ``folder``; None for a run logged without it."""
    if not any(a.path == WEIGHTS for a in client.list_artifacts(run_id, WEIGHTS.split("/")[0])):
        return None
    return Path(client.download_artifacts(run_id, WEIGHTS, str(folder)))


def failure(spec: str, store: str, exc: BaseException) -> TilepipeError:
    """The one-line error for a model MLflow cannot give."""
    text = redact_text(str(exc).strip())
    reason = text.splitlines()[0][:300] if text else type(exc).__name__
    return TilepipeError(f"{spec}: cannot load from MLflow at {redact(store)} ({reason})")


def fetch(spec: str, folder: Path) -> dict[str, Any]:
    """Resolve ``spec`` and copy its weights into ``folder``.

    The answer: ``path`` (None: no weights) and ``model`` (:func:`identify`), or ``error``.
    """
    from mlflow.exceptions import MlflowException

    try:
        mlflow, client, store = mlflow_client(spec)
    except TilepipeError as exc:
        return {"error": str(exc)}
    try:
        with quiet_downloads():
            model = identify(mlflow, client, spec)
            path = download_weights(client, str(model["run_id"]), folder)
    except (MlflowException, OSError) as exc:
        return {"error": str(failure(spec, store, exc))}
    return {"path": None if path is None else str(path), "model": model}


class Prefetch:
    """The weights of an MLflow model, fetched by a helper process started at once."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self._folder = tempfile.TemporaryDirectory(prefix="tilepipe-weights-")
        cmd = [sys.executable, "-m", "tilepipe.tracking.fetch", spec, self._folder.name]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._answer: dict[str, Any] | None = None

    def path(self) -> Path | None:
        """The fetched weights file; None when the run has none (or the helper failed: resolve here)."""
        if self._answer is None:
            out, _ = self._proc.communicate()
            lines = out.strip().splitlines()
            self._answer = json.loads(lines[-1]) if self._proc.returncode == 0 and lines else {"path": None}
        if self._answer.get("error"):
            raise TilepipeError(self._answer["error"])
        return Path(self._answer["path"]) if self._answer.get("path") else None

    def model(self) -> dict[str, str | None] | None:
        """Name, version, run id and source of the fetched model (None when the helper could not tell)."""
        self.path()
        return self._answer.get("model") if self._answer else None

    def close(self) -> None:
        """Stop the helper if it still runs and remove what it fetched."""
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._folder.cleanup()


def main(argv: list[str]) -> int:
    """``python -m tilepipe.tracking.fetch SPEC FOLDER``: print the fetch's answer as one JSON line."""
    spec, folder = argv
    print(json.dumps(fetch(spec, Path(folder))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
