"""Finding a model: a ``model.pt`` path, a registry alias or version, or an MLflow run."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

from torch import nn

from tilepipe.errors import TilepipeError, bad_file
from tilepipe.ml.checkpoint import ModelMeta, load_model, model_from_meta
from tilepipe.tracking.store import tracking_uri

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
QUIET_MLFLOW = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


def resolve_model(spec: str | Path) -> tuple[nn.Module, ModelMeta]:
    """Model (eval mode) and meta from a ``model.pt`` path, ``models:/NAME@ALIAS`` or an MLflow run id."""
    text = str(spec).strip()
    if text.startswith(("models:/", "runs:/")) or RUN_ID.match(text):
        return _from_mlflow(text)
    path = Path(text)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise TilepipeError(f"{text}: no such model file, and not models:/NAME@ALIAS or an MLflow run id")
    try:
        return load_model(path)
    except (RuntimeError, KeyError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
        reason = (str(exc).strip().splitlines() or [""])[0][:120]
        raise bad_file(path, f"not a tilepipe model.pt ({type(exc).__name__}: {reason})") from None


def _from_mlflow(spec: str) -> tuple[nn.Module, ModelMeta]:
    import mlflow
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    store = tracking_uri()
    if store.startswith("sqlite:///") and not Path(store.removeprefix("sqlite:///")).is_file():
        raise TilepipeError(
            f"{spec}: no MLflow store at {store} (train first, set MLFLOW_TRACKING_URI, "
            "or pass --model models/model.pt)"
        )
    mlflow.set_tracking_uri(store)
    client = mlflow.MlflowClient()
    bar_setting = os.environ.get(QUIET_MLFLOW)
    os.environ[QUIET_MLFLOW] = "false"  # no download progress bars around the one summary line
    try:
        if spec.startswith("models:/"):
            run_id, uri = _registry_run(client, spec), spec
        elif spec.startswith("runs:/"):
            run_id, uri = spec.split("/")[1], spec
        else:
            run_id, uri = client.get_run(spec).info.run_id, f"runs:/{spec}/model"
        meta = ModelMeta.from_dict(mlflow.artifacts.load_dict(f"runs:/{run_id}/model_meta.json"))
        logged = mlflow.pytorch.load_model(uri, map_location="cpu")
    except (MlflowException, OSError) as exc:
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise TilepipeError(f"{spec}: cannot load from MLflow at {store} ({reason})") from None
    finally:
        if bar_setting is None:
            os.environ.pop(QUIET_MLFLOW, None)
        else:
            os.environ[QUIET_MLFLOW] = bar_setting
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


def _registry_run(client, spec: str) -> str:
    """The source run of a registered version: ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""
    from mlflow.exceptions import MlflowException

    rest = spec.removeprefix("models:/")
    if "@" in rest:
        version = client.get_model_version_by_alias(*rest.split("@", 1))
    elif "/" in rest:
        version = client.get_model_version(*rest.split("/", 1))
    else:  # a logged model id (models:/m-...)
        import mlflow

        return mlflow.get_logged_model(rest).source_run_id
    run_id = version.run_id or version.tags.get("run_id")
    if not run_id and version.model_id:
        import mlflow

        run_id = mlflow.get_logged_model(version.model_id).source_run_id
    if not run_id:
        raise MlflowException(f"version {version.version} of {version.name} has no source run")
    return run_id
