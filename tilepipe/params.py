"""The one config: ``params.yaml`` validated by one pydantic model, with ``--set KEY=VALUE``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tilepipe.errors import TilepipeError
from tilepipe.fsutil import input_problem

DTYPES = ("uint8", "uint16", "int16", "uint32", "int32", "float32", "float64")


class Section(BaseModel):
    """Base of every params section: unknown keys are an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ClassDef(Section):
    """One land-cover class: its name and its value in label rasters."""

    name: str = Field(min_length=1)
    value: int = Field(ge=0, le=254)


class StacParams(Section):
    """Which asset of a STAC item is the image and which the labels (None: by role, data / labels)."""

    image_asset: str | None = None
    labels_asset: str | None = None
    use_geometry: bool = False  # the item's geometry is the scene's area of interest


class DataParams(Section):
    """Where the scene catalog (CSV or STAC) lives and which classes its labels hold."""

    catalog: Path
    imagery: Path
    classes: list[ClassDef] = Field(min_length=2)
    background: str = "ignore"
    stac: StacParams = StacParams()

    @model_validator(mode="after")
    def _check_classes(self) -> DataParams:
        names = [c.name for c in self.classes]
        values = [c.value for c in self.classes]
        if len(set(names)) != len(names):
            raise ValueError("class names must be unique")
        if len(set(values)) != len(values):
            raise ValueError("class values must be unique")
        if self.background != "ignore" and self.background not in names:
            raise ValueError(f"background must be 'ignore' or one of {names}")
        return self

    @property
    def class_names(self) -> list[str]:
        """Class names in index order (the model's output order)."""
        return [c.name for c in self.classes]


class BandParams(Section):
    """Which named bands feed the model, how each dtype's range maps to [0, 1], then how it is normalised."""

    input: list[str] = Field(min_length=1)
    scale: dict[Literal[DTYPES], tuple[float, float]]  # type: ignore[valid-type]
    # range (as scaled) | standardize | percentile (training tiles' figures) | scene (each scene's own)
    normalize: Literal["range", "standardize", "percentile", "scene"] = "range"

    @field_validator("input")
    @classmethod
    def _lower_unique(cls, names: list[str]) -> list[str]:
        lowered = [n.strip().lower() for n in names]
        if len(set(lowered)) != len(lowered):
            raise ValueError("band names must be unique")
        return lowered

    @field_validator("scale")
    @classmethod
    def _ranges(cls, scale: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        for dtype, (low, high) in scale.items():
            if not high > low:
                raise ValueError(f"{dtype}: range [low, high] needs high > low")
        return scale


BUILTIN_CLASSES = ("water", "forest", "cropland", "urban", "bare")  # the generator's land covers


def _builtin_classes() -> list[ClassDef]:
    return [ClassDef(name=name, value=i) for i, name in enumerate(BUILTIN_CLASSES, start=1)]


class SynthesizeParams(Section):
    """The built-in synthetic scene collection: its size, seed and own classes.

    Its classes are the built-in data's definition, apart from ``data.classes`` (what a catalog's
    labels hold), so a user's classes never invalidate or break this stage.
    """

    scenes: int = Field(ge=3, le=200)
    min_size: int = Field(ge=64)
    max_size: int = Field(ge=64)
    seed: int
    classes: list[ClassDef] = Field(default_factory=_builtin_classes, min_length=2)

    @model_validator(mode="after")
    def _sizes(self) -> SynthesizeParams:
        if self.max_size < self.min_size:
            raise ValueError("max_size must be >= min_size")
        if len(self.classes) > len(BUILTIN_CLASSES):
            raise ValueError(f"the generator draws at most {len(BUILTIN_CLASSES)} classes")
        if any(c.value == 0 for c in self.classes):
            raise ValueError("class value 0 marks unlabelled pixels in the generated label rasters")
        if len({c.name for c in self.classes}) < len(self.classes):
            raise ValueError("class names must be unique")
        if len({c.value for c in self.classes}) < len(self.classes):
            raise ValueError("class values must be unique")
        return self


class IngestParams(Section):
    """What to do with a scene that fails validation."""

    on_error: Literal["fail", "skip"] = "fail"


class TileParams(Section):
    """Tile geometry, filtering, output sharding and parallelism."""

    size: int = Field(gt=0, le=4096)
    stride: int = Field(gt=0, le=4096)
    gsd: float | None = Field(default=None, gt=0)
    max_nodata: float = Field(ge=0, le=1)
    workers: int = Field(ge=1, le=64)
    shard_mb: int = Field(ge=1, le=4096)
    gdal_cache_mb: int = Field(ge=8, le=4096)


class SplitParams(Section):
    """How whole scenes (or, opted in, spatial blocks of one scene) go to train/val/test."""

    ratios: dict[Literal["train", "val", "test"], float]
    spatial_blocks: bool = False
    block_tiles: int = Field(default=8, ge=1)
    buffer_tiles: int = Field(default=1, ge=0)

    @field_validator("ratios")
    @classmethod
    def _sum_to_one(cls, ratios: dict[str, float]) -> dict[str, float]:
        if set(ratios) != {"train", "val", "test"}:
            raise ValueError("needs train, val and test")
        if any(r < 0 for r in ratios.values()) or abs(sum(ratios.values()) - 1) > 1e-6:
            raise ValueError(f"ratios must be >= 0 and sum to 1, got {sum(ratios.values()):g}")
        return ratios


class EarlyStopping(Section):
    """Stop when the validation metric has not improved for ``patience`` epochs."""

    metric: Literal["val_macro_f1", "val_accuracy", "val_miou", "val_loss"] = "val_macro_f1"
    patience: int = Field(default=5, ge=1)


class TrainParams(Section):
    """Task, model, optimisation and data-loading settings of the train stage."""

    task: Literal["classification", "segmentation"] = "classification"
    model: Literal["small_cnn", "resnet18", "unet"] = "small_cnn"
    width: int = Field(default=32, ge=4, le=512)
    epochs: int = Field(ge=1, le=10_000)
    batch_size: int = Field(ge=1, le=65_536)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(gt=0, le=10)
    weight_decay: float = Field(default=0.0, ge=0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    early_stopping: EarlyStopping = EarlyStopping()
    min_purity: float = Field(default=0.6, gt=0, le=1)
    class_weights: Literal["none", "inverse", "sqrt_inverse"] = "sqrt_inverse"
    augment: Literal["none", "geometric", "photometric", "both"] = "geometric"
    precision: Literal["fp32", "bf16", "amp"] = "fp32"
    workers: int = Field(default=0, ge=0, le=64)
    threads: int = Field(default=0, ge=0, le=256)
    resume: bool = False
    nproc_per_node: int = Field(default=1, ge=1, le=256)  # processes (torchrun); the batch is split across
    # pretrained weights from a local file, PATH or PATH#sha256=HEX (tilepipe/ml/pretrained.py)
    init: str | None = None
    freeze_epochs: int = Field(default=0, ge=0, le=10_000)  # first epochs train the head only

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_bool(cls, value: Any) -> Any:
        """``true`` / ``false`` (the flag before photometric jitter existed): geometric / none."""
        return {True: "geometric", False: "none"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _task_fits_model(self) -> TrainParams:
        if (self.task == "segmentation") != (self.model == "unet"):
            raise ValueError("task segmentation needs model unet, and unet is for segmentation")
        return self

    @field_validator("init")
    @classmethod
    def _init_spec(cls, init: str | None) -> str | None:
        if init is not None and not re.fullmatch(r"[^#]+(#sha256=[0-9a-fA-F]{64})?", init.strip()):
            raise ValueError("expected PATH or PATH#sha256=<64 hex digits>")
        return init.strip() or None if init is not None else None

    @model_validator(mode="after")
    def _freeze_needs_init(self) -> TrainParams:
        if self.freeze_epochs and not self.init:
            raise ValueError("freeze_epochs needs train.init (it holds pretrained weights still)")
        return self

    @model_validator(mode="after")
    def _batch_splits(self) -> TrainParams:
        if self.batch_size % self.nproc_per_node:
            raise ValueError("batch_size must be a multiple of nproc_per_node (each process takes a share)")
        return self


class EvaluateParams(Section):
    """Evaluation batch size and when to warn that the test set is too small."""

    batch_size: int = Field(default=256, ge=1)
    min_test_scenes: int = Field(default=2, ge=1)
    min_test_tiles: int = Field(default=50, ge=1)


class PredictParams(Section):
    """Sliding-window prediction of whole scenes."""

    window: int = Field(default=256, ge=8, le=8192)
    margin: int = Field(default=48, ge=0)
    batch_size: int = Field(default=16, ge=1)
    gsd_tolerance: float = Field(default=0.25, ge=0)  # share a scene's GSD may lie outside the trained range

    @model_validator(mode="after")
    def _fits(self) -> PredictParams:
        if 2 * self.margin >= self.window:
            raise ValueError("margin must be less than half the window")
        return self


class StudyParams(Section):
    """The scene-scaling study (``tilepipe study``): subset sizes, repeats and a per-training budget."""

    sizes: list[int] | None = None  # None: 1, 2, 4, ... and all training scenes
    repeats: int = Field(default=3, ge=1, le=100)
    seed: int = 0
    epochs: int = Field(default=8, ge=1, le=10_000)
    train_tiles: int | None = Field(default=None, ge=1)  # None: the smallest training scene's usable tiles
    val_tiles: int | None = Field(default=600, ge=1)  # None: every validation tile, every epoch
    threads: int = Field(default=1, ge=1, le=256)
    parallel: int | None = Field(default=None, ge=1, le=256)  # None: cores // threads

    @field_validator("sizes")
    @classmethod
    def _positive_unique(cls, sizes: list[int] | None) -> list[int] | None:
        if sizes is None:
            return None
        if not sizes or min(sizes) < 1 or len(set(sizes)) != len(sizes):
            raise ValueError("needs distinct scene counts >= 1, e.g. [1, 2, 4], or null")
        return sorted(sizes)


class CvParams(Section):
    """Scene-grouped cross-validation (``tilepipe cv``): how many folds."""

    folds: int = Field(default=5, ge=2, le=100)


class ScheduleParams(Section):
    """When the served "nightly" Prefect deployment runs (cron, UTC)."""

    cron: str = "0 2 * * *"


class OrchestrateParams(Section):
    """Where the flow's tile tasks run: a thread pool in the flow's process, or a Dask cluster."""

    runner: Literal["threads", "dask"] = "threads"
    # an existing scheduler (`dask scheduler`), e.g. tcp://10.0.0.5:8786; null: a LocalCluster of
    # tile.workers processes started for the run
    dask_address: str | None = Field(default=None, pattern=r"^(tcp|tls)://[^\s/:]+:[0-9]{1,5}$")

    @model_validator(mode="after")
    def _address_needs_dask(self) -> OrchestrateParams:
        if self.dask_address and self.runner != "dask":
            raise ValueError("dask_address is set but runner is threads: set orchestrate.runner: dask")
        return self


class MapParams(Section):
    """Mapping an archive (``tilepipe map``, the ``map-nightly`` deployment): what, with what, where, when."""

    catalog: str | None = None  # CSV / STAC catalog, folder or s3://bucket/prefix/; None: data.catalog
    out: str = Field(default="maps", min_length=1)  # a local folder or s3://bucket/prefix/
    model: str | None = None  # model.pt, models folder, models:/NAME@ALIAS, runs:/...; None: the champion
    cron: str = "0 4 * * *"  # the map-nightly deployment (UTC)
    probabilities: bool = False
    confidence: bool = False
    # ONNX Runtime: the same maps as torch, about 2x faster on this CPU (docs/maps.md); torch is the
    # reference and the fallback when ONNX Runtime is missing or cannot run the model
    engine: Literal["onnxruntime", "torch"] = "onnxruntime"

    @field_validator("out")
    @classmethod
    def _local_or_s3(cls, out: str) -> str:
        if "://" in out and not out.startswith("s3://"):
            raise ValueError("maps go to a local folder or an s3://bucket/prefix/")
        return out


class TrackParams(Section):
    """MLflow experiment, registered model name and the metric that crowns a champion."""

    experiment: str = Field(min_length=1)
    model_name: str = Field(min_length=1)
    champion_metric: Literal["macro_f1", "accuracy", "miou"] = "macro_f1"
    # the new version takes the alias only when the lower end of the paired scene-bootstrap interval
    # of (new - champion) at this confidence is above the margin
    champion_confidence: float = Field(default=0.9, gt=0, lt=1)
    champion_margin: float = Field(default=0.0, ge=0, lt=1)


class Params(Section):
    """The whole of ``params.yaml``."""

    seed: int = 0
    data: DataParams
    bands: BandParams
    synthesize: SynthesizeParams
    ingest: IngestParams
    tile: TileParams
    split: SplitParams
    train: TrainParams
    evaluate: EvaluateParams
    predict: PredictParams
    track: TrackParams
    schedule: ScheduleParams = ScheduleParams()
    orchestrate: OrchestrateParams = OrchestrateParams()
    study: StudyParams = StudyParams()
    cv: CvParams = CvParams()
    map: MapParams = MapParams()

    @model_validator(mode="after")
    def _unet_tile_size(self) -> Params:
        if self.train.model == "unet" and self.tile.size % 8:
            raise ValueError("train.model unet needs tile.size divisible by 8")
        return self


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b=value`` (the syntax of ``dvc exp run -S``) into a key path and a YAML value."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise TilepipeError(f"--set {text!r}: expected KEY=VALUE, e.g. tile.size=128")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise TilepipeError(f"--set {key}: value is not valid YAML ({yaml_problem(exc)})") from None
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``KEY=VALUE`` override set."""
    result = _deep_copy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return result


def _deep_copy(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in raw.items()}


def _related(key: str, other: str) -> bool:
    """True when one dotted key is the other or holds it (``data`` and ``data.background``)."""
    return key == other or key.startswith(other + ".") or other.startswith(key + ".")


def validate(raw: dict[str, Any], source: str = "params", overrides: list[str] | None = None) -> Params:
    """Validate a params dict; the error names every bad key, where its value came from and what is wrong.

    A key set by one of ``overrides`` (``KEY=VALUE``) is blamed on that ``--set``, any other on ``source``.
    """
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        set_by = {text.partition("=")[0].strip(): text for text in overrides or []}
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            overridden = [f"--set {v}" for k, v in set_by.items() if _related(key, k)]
            culprit = overridden[-1] if overridden else source
            problems.append(f"{culprit}: {key}: {msg}")
        raise TilepipeError("; ".join(problems)) from None


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong, and where."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(exc, 'problem', None) or type(exc).__name__}{where}"


def read_raw(path: Path) -> dict[str, Any]:
    """Read a params YAML file as a dict (safe loader), or fail naming the file."""
    if problem := input_problem(path, missing="params file not found"):
        raise TilepipeError(f"{path}: {problem}")
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise TilepipeError(f"{path}: not UTF-8 text; save the params file as UTF-8") from None
    except yaml.YAMLError as exc:
        raise TilepipeError(f"{path}: not valid YAML ({yaml_problem(exc)})") from None
    if not isinstance(raw, dict):
        raise TilepipeError(f"{path}: expected a mapping of sections at the top level")
    return raw


def load_params(path: Path | str = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Load, override and validate ``params.yaml``."""
    raw = apply_overrides(read_raw(Path(path)), overrides or [])
    return validate(raw, source=str(path), overrides=overrides)


def flatten(params: BaseModel | dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten params to ``section.key -> str`` for experiment trackers."""
    data = params.model_dump(mode="json") if isinstance(params, BaseModel) else params
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = str(value)
    return flat
