"""Predict stage: map the held-out test scenes (or one scene) to georeferenced COGs."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tilepipe.fsutil import atomic_dir, file_sha256, write_json
from tilepipe.geo.aoi import aoi_file
from tilepipe.mapping.predict import predict_scene
from tilepipe.mapping.scoring import held_out_scenes
from tilepipe.mapping.stac_item import build_item, item_path, write_catalog, write_item
from tilepipe.params import Params
from tilepipe.tracking.fetch import Prefetch
from tilepipe.tracking.models import describe_model, resolve_model


def reproducible(described: dict[str, Any], model_spec: str | Path) -> dict[str, Any]:
    """The model as the held-out items name it.

    A ``model.pt`` of this pipeline is named by its SHA-256, not by the MLflow run that trained it:
    a run id differs from run to run, and these items are a DVC output that the same model must
    reproduce byte for byte.
    """
    if described.get("name") is not None:  # a registered model: its name, version and run
        return described
    path = Path(model_spec)
    model_file = path / "model.pt" if path.is_dir() else path
    return {**described, "run_id": None, "sha256": file_sha256(model_file)}


def predict_held_out(
    params: Params,
    model_spec: str | Path,
    scenes_json: Path,
    split_json: Path,
    out_dir: Path,
    prefetch: Prefetch | None = None,
    trust_pickle: bool = False,
) -> list[dict[str, Any]]:
    """Map every held-out test scene to ``out_dir/<scene_id>.tif``; the directory is replaced whole.

    Beside each map its STAC item ``<scene_id>.json``, all linked by ``out_dir/catalog.json``.
    ``trust_pickle``: see :func:`tilepipe.tracking.models.resolve_model`.
    """
    model, meta = resolve_model(model_spec, prefetch, trust_pickle)
    described = reproducible(describe_model(model_spec, prefetch), model_spec)
    records = held_out_scenes(scenes_json, split_json)
    summaries, items = [], []
    created = datetime.now(UTC)  # the items' datetime only where a scene's own time is unknown
    with atomic_dir(out_dir) as tmp:
        for record in records:
            output = tmp / f"{record.scene_id}.tif"
            item_path(output)  # a scene id that would overwrite catalog.json fails before any work
            aoi = None if record.aoi_geometry is None else (record.aoi_geometry, record.crs)
            chosen = (False, record.band_mapping, aoi)  # no probability bands, the scene's bands and AOI
            summary = predict_scene(params, model, meta, record.image, output, *chosen)
            summaries.append({"scene_id": record.scene_id, **summary, "output": output.name})
            when = getattr(record, "datetime", None)  # scenes ingested from a STAC item know it
            item = build_item(output, record.image, meta, described, record.scene_id, when, created, out_dir)
            items.append(item)
        write_catalog(tmp, items, f"tilepipe predictions of {len(records)} held-out test scene(s)")
        # timings (and the printed line, which names the temp folder) vary from run to run: the
        # record holds what the maps are, so the same maps give the same bytes (DVC, git)
        recorded = [{k: v for k, v in s.items() if k not in ("seconds", "line")} for s in summaries]
        write_json(tmp / "predictions.json", {"model": str(model_spec), "scenes": recorded})
    print(f"predict: {len(records)} held-out test scene(s) mapped into {out_dir}")
    return summaries


def predict_one(
    params: Params,
    model_spec: str | Path,
    scene: Path,
    output: Path,
    probabilities: bool = False,
    bands: str | None = None,
    prefetch: Prefetch | None = None,
    aoi: Path | None = None,
    confidence: bool = False,
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """Map one scene to ``output`` (COG), optionally with a probability band per class and a confidence band.

    Its STAC item goes beside it (``<output stem>.json``). ``aoi``: a GeoJSON or vector file; the map
    is nodata outside it.

    ``prefetch``: an MLflow model's weights being fetched since before torch was imported.
    ``trust_pickle``: see :func:`tilepipe.tracking.models.resolve_model`.
    """
    model, meta = resolve_model(model_spec, prefetch, trust_pickle)
    item = item_path(Path(output))
    area = None if aoi is None else aoi_file(aoi)
    summary = predict_scene(
        params, model, meta, scene, output, probabilities, bands, aoi=area, confidence=confidence
    )
    write_item(build_item(Path(output), scene, meta, describe_model(model_spec, prefetch)), item)
    return {**summary, "item": str(item)}
