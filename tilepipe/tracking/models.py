"""Finding a model: a ``model.pt`` path, a registry alias or version, or an MLflow run."""

from __future__ import annotations

import json
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from tilepipe.errors import TilepipeError, bad_file
from tilepipe.fsutil import atomic_path, file_sha256
from tilepipe.ml.checkpoint import ModelMeta, load_model, model_from_meta, save_model
from tilepipe.tracking.fetch import (
    WEIGHTS,
    Prefetch,
    download_weights,
    failure,
    fetch,
    identify,
    is_mlflow_spec,
    mlflow_client,
    quiet_downloads,
    spec_run,
)


def resolve_model(
    spec: str | Path, prefetch: Prefetch | None = None, trust_pickle: bool = False
) -> tuple[nn.Module, ModelMeta]:
    """Model (eval mode) and meta from a ``model.pt`` path, ``models:/NAME@ALIAS`` or an MLflow run id.

    ``prefetch`` (started before torch was imported) holds the MLflow model's weights when ready.
    ``trust_pickle``: a run without its ``weights/model.pt`` may be loaded from its pickled MLflow
    model (unpickling runs whatever code the tracking server returns); refused otherwise.
    """
    text = str(spec).strip()
    if is_mlflow_spec(text):
        fetched = prefetch.path() if prefetch is not None else None
        return _load(fetched) if fetched is not None else _from_mlflow(text, trust_pickle)
    path = Path(text)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise TilepipeError(f"{text}: no such model file, and not models:/NAME@ALIAS or an MLflow run id")
    return _load(path)


def describe_model(spec: str | Path, prefetch: Prefetch | None = None) -> dict[str, str | None]:
    """Registered ``name`` and ``version``, ``run_id`` and ``source`` of a model (None where unknown).

    A ``model.pt`` path has the run of the ``run.json`` training wrote beside it, if there is one.
    """
    text = str(spec).strip()
    if not is_mlflow_spec(text):
        path = Path(text)
        run_file = (path if path.is_dir() else path.parent) / "run.json"
        try:
            run_id = json.loads(run_file.read_text()).get("run_id") if run_file.is_file() else None
        except (OSError, ValueError, AttributeError):
            run_id = None
        return {"name": None, "version": None, "run_id": run_id, "source": text}
    known = prefetch.model() if prefetch is not None else None
    if known:
        return known
    from mlflow.exceptions import MlflowException

    mlflow, client, store = mlflow_client(text)
    try:
        return identify(mlflow, client, text)
    except (MlflowException, OSError) as exc:
        raise failure(text, store, exc) from None


def _load(path: Path) -> tuple[nn.Module, ModelMeta]:
    try:
        return load_model(path)
    except (RuntimeError, KeyError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
        reason = (str(exc).strip().splitlines() or [""])[0][:120]
        raise bad_file(path, f"not a tilepipe model.pt ({type(exc).__name__}: {reason})") from None


def _from_mlflow(spec: str, trust_pickle: bool = False) -> tuple[nn.Module, ModelMeta]:
    """The run's own weights file (``weights/model.pt``), else (trusted) its logged MLflow model."""
    from mlflow.exceptions import MlflowException

    mlflow, client, store = mlflow_client(spec)
    try:
        with quiet_downloads(), tempfile.TemporaryDirectory(prefix="tilepipe-weights-") as folder:
            run_id, uri = spec_run(mlflow, client, spec)
            weights = download_weights(client, run_id, Path(folder))
            if weights is not None:
                return _load(weights)
            if not trust_pickle:
                raise untrusted(spec, run_id)
            return _logged_model(mlflow, run_id, uri, spec)
    except (MlflowException, OSError) as exc:
        raise failure(spec, store, exc) from None


def untrusted(spec: str, run_id: str) -> TilepipeError:
    """The one line for a model that exists only as a pickle, loaded without ``--trust-pickle``."""
    return TilepipeError(
        f"{spec}: run {run_id} has no {WEIGHTS}, only a pickled MLflow model, and unpickling runs any "
        "code the tracking server sends: pass --trust-pickle to load it only if you trust that server"
    )


def _logged_model(mlflow: Any, run_id: str, uri: str, spec: str) -> tuple[nn.Module, ModelMeta]:
    """The MLflow model of a run logged before its weights were logged apart (slower to load)."""
    import mlflow.pytorch  # noqa: F401 - registers the flavour

    meta = ModelMeta.from_dict(mlflow.artifacts.load_dict(f"runs:/{run_id}/model_meta.json"))
    logged = mlflow.pytorch.load_model(uri, map_location="cpu")
    return _eager(logged, meta, spec), meta


def _eager(logged: nn.Module, meta: ModelMeta, spec: str) -> nn.Module:
    """The logged weights in a fresh eager model.

    MLflow saves PyTorch models as ``torch.export`` programs (pt2) whose graph is traced at the
    input example's shape (one tile); sliding windows of any other size need the eager module.
    """
    model = model_from_meta(meta)
    try:
        model.load_state_dict(logged.state_dict())
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[0][:200]
        raise TilepipeError(f"{spec}: logged weights do not fit its model_meta.json ({reason})") from None
    return model.eval()


def model_file(
    spec: str | Path, cache: Path, prefetch: Prefetch | None = None
) -> tuple[Path, dict[str, Any]]:
    """A ``model.pt`` for ``spec`` that any process can load, and the model's identity (with its SHA-256).

    A path is the file itself; an MLflow model's weights are copied into ``cache/<sha256>.pt`` (a
    run logged without its weights file: the model rebuilt from MLflow and saved there).
    """
    text = str(spec).strip()
    if not is_mlflow_spec(text):
        path = Path(text) / "model.pt" if Path(text).is_dir() else Path(text)
        if not path.is_file():
            raise TilepipeError(f"{text}: no such model file, and not models:/NAME@ALIAS or an MLflow run id")
        _load(path)  # not a tilepipe model: one line now, not one per scene
        return path.resolve(), {**describe_model(spec), "sha256": file_sha256(path)}
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".weights-", dir=cache) as folder:
        if prefetch is not None:
            fetched, described = prefetch.path(), describe_model(spec, prefetch)
        else:  # in this process: the same answer as the helper's
            answer = fetch(text, Path(folder))
            if answer.get("error"):
                raise TilepipeError(answer["error"])
            fetched, described = answer["path"] and Path(answer["path"]), answer["model"]
        if fetched is None:  # a run logged before its weights file was
            model, meta = resolve_model(text)
            fetched = Path(folder) / "model.pt"
            save_model(fetched, model, meta)
        sha = file_sha256(fetched)
        target = cache / f"{sha}.pt"
        if not target.is_file():
            with atomic_path(target) as tmp:
                shutil.copyfile(fetched, tmp)
    return target.resolve(), {**described, "sha256": sha}
