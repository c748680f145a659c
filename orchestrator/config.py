"""Study configuration: the search-space YAML validated up front into typed objects.

Every error names the field (``search.opt_level.1``) and the allowed values, and is raised before
any Ray work starts.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, WrapValidator,
                      field_serializer, field_validator, model_validator)

from orchestrator.settings import Checkpointing, Fusion, HalfDtype, OptLevel, Setting, SpeedFlags


class DataConfig(BaseModel):
    """Where a model's training/validation data comes from."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["synthetic", "folder"] = "synthetic"
    root: Path | None = None  # required for kind=folder
    height: int = Field(default=64, gt=0)
    width: int = Field(default=64, gt=0)
    train_samples: int = Field(default=64, gt=0)  # synthetic only: how many to generate
    val_samples: int = Field(default=16, gt=0)
    seed: int = 0
    options: dict[str, Any] = Field(default_factory=dict)  # model-specific (frames, shots, mask bins…)

    @model_validator(mode="after")
    def _folder_needs_root(self) -> "DataConfig":
        if self.kind == "folder" and self.root is None:
            raise ValueError("data.root is required when data.kind is 'folder'")
        return self


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str  # registry name or path/to/file.py:ClassName
    preset: str = "tiny"
    options: dict[str, Any] = Field(default_factory=dict)  # overrides of preset keys


def _auto_or(value: Any, handler: Any) -> Any:
    """The literal "auto" as it is; anything else validated as annotated (errors keep their field)."""
    return value if value == "auto" else handler(value)


_AUTO = WrapValidator(_auto_or)


class SearchConfig(BaseModel):
    """The dimensions searched. Each is a list of candidate values; the study crosses them."""

    model_config = ConfigDict(extra="forbid")

    opt_level: list[OptLevel] = Field(default_factory=lambda: ["O0", "O1"], min_length=1)
    dtype: list[HalfDtype] = Field(default_factory=lambda: ["bf16"], min_length=1)
    # "auto": per precision setting, the largest batch that fits (orchestrator/batch_finder.py)
    batch_size: list[PositiveInt | Literal["auto"]] = Field(default_factory=lambda: [2], min_length=1)
    # site -> candidate values; "auto" (every site) or a site's "auto": the doctor's suggestions,
    # filled in by orchestrator.doctor.expand_auto_eps before the study starts
    eps: Annotated[dict[str, Annotated[list[PositiveFloat], _AUTO]], _AUTO] = Field(default_factory=dict)
    checkpointing: list[Checkpointing] = Field(default_factory=lambda: ["none"], min_length=1)
    fused_optimizer: list[bool] = Field(default_factory=lambda: [False], min_length=1)
    fusion: list[Fusion] = Field(default_factory=lambda: ["none"], min_length=1)
    affinity: list[bool] = Field(default_factory=lambda: [False], min_length=1)
    channels_last: list[bool] = Field(default_factory=lambda: [False], min_length=1)
    tf32: list[bool] = Field(default_factory=lambda: [False], min_length=1)

    @field_serializer("eps")
    def _eps_as_given(self, value: Any) -> Any:
        return value  # "auto" (whole or per site) is no list: written back as given

    @property
    def auto_eps(self) -> bool:
        """``eps: auto`` (or a site's ``auto``) still waits for the doctor's values."""
        return self.eps == "auto" or "auto" in self.eps.values()

    @property
    def auto_batch(self) -> bool:
        return "auto" in self.batch_size

    @property
    def fixed_batch_sizes(self) -> list[int]:
        """The numeric batch sizes; with only ``auto``, 1 stands in until the finder replaces it."""
        return [b for b in self.batch_size if b != "auto"] or [1]

    def candidates(self) -> list[Setting]:
        """Every distinct setting of the grid (dtype is irrelevant at O0, so O0 appears once per
        combination of the other dimensions)."""
        if self.auto_eps:
            raise ValueError("search.eps 'auto' must be expanded first (orchestrator.doctor.expand_auto_eps)")
        flag_names = ["checkpointing", "fused_optimizer", "fusion", "affinity", "channels_last", "tf32"]
        eps_sites = sorted(self.eps)
        seen: dict[str, Setting] = {}
        for level, dtype, batch, *rest in itertools.product(
            self.opt_level, self.dtype, self.fixed_batch_sizes,
            *[getattr(self, n) for n in flag_names], *[self.eps[s] for s in eps_sites],
        ):
            flags = SpeedFlags(**dict(zip(flag_names, rest[: len(flag_names)])))
            eps = dict(zip(eps_sites, rest[len(flag_names):]))
            setting = Setting(opt_level=level, dtype=dtype,
                              batch_size=batch, eps=eps, flags=flags)
            seen.setdefault(setting.key(), setting)
        return list(seen.values())


class BudgetConfig(BaseModel):
    """How much compute each stage spends."""

    model_config = ConfigDict(extra="forbid")

    profile_warmup: int = Field(default=2, ge=0)  # untimed steps before each setting's first block
    profile_steps: int = Field(default=5, gt=0)  # timed steps per block
    profile_rounds: int = Field(default=3, gt=0)  # interleaved reference/setting block pairs
    max_profiled: int = Field(default=64, gt=0)  # sample this many settings when the grid is larger
    train_samples: int = Field(default=128, gt=0)  # quality budget: training samples per trial
    checkpoint_every: int = Field(default=20, gt=0)  # steps between checkpoints in quality trials
    reference_seeds: int = Field(default=3, ge=2)  # fp32 replicates that define the noise band
    max_trials: int = Field(default=6, gt=0)  # Optuna trials in stage 2
    keep_slower: bool = False  # also quality-test settings slower than the reference
    # early stopping in stage 2: at these fractions of train_samples a trial's quality is compared
    # with the fp32 references' quality after the same number of samples; a trial whose drift there
    # is more than early_stop_bands noise bands on the harmful side stops ([] = never stop early)
    early_stop_at: list[float] = Field(default_factory=lambda: [0.5])
    early_stop_bands: float = Field(default=3.0, gt=0)

    @field_validator("early_stop_at")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if any(not 0 < f < 1 for f in value):
            raise ValueError(f"fractions of train_samples strictly between 0 and 1; got {value}")
        return sorted(set(value))

    def rung_samples(self) -> list[int]:
        """The sample counts at which quality is measured before the end of training."""
        return sorted({max(1, round(f * self.train_samples)) for f in self.early_stop_at} - {self.train_samples})


class ResourcesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    workers: int = Field(default=1, gt=0)  # DDP workers per trial
    cpus_per_worker: float = Field(default=1, gt=0)
    gpus_per_worker: float = Field(default=0, ge=0)
    max_concurrent_trials: int = Field(default=1, gt=0)
    # memory a trial may use, for batch_size: auto (required on CPU; on GPU the device's free memory)
    memory_budget_mib: float | None = Field(default=None, gt=0)
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # on an autoscaling cluster: how long to wait for nodes that fit a trial before giving up
    node_wait_seconds: float = Field(default=900, ge=0)

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0


class QualityConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metric: str = "ssim"  # decides the recommendation: ssim | psnr | l1 | fd
    feature_network: Path | None = None  # TorchScript feature extractor for the Fréchet distance
    band_multiplier: float = Field(default=1.0, gt=0)  # a drift counts as inside when |drift| <= multiplier x band
    eval_batches: int | None = None  # validation batches per evaluation (None = whole val split)

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        if value not in ("ssim", "psnr", "l1", "fd"):
            raise ValueError(f"must be one of ssim, psnr, l1, fd; got {value!r}")
        return value


class TrackingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    uri: str | None = None  # default: sqlite file in the output folder
    experiment: str | None = None  # default: the study's experiment name


class StudyConfig(BaseModel):
    """A whole study, as read from ``search_spaces/<model>.yaml`` plus command-line overrides."""

    model_config = ConfigDict(extra="forbid")

    experiment: str = Field(min_length=1)
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    reference_batch_size: PositiveInt | None = None  # default: the smallest searched batch size
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    seed: int = 0

    @model_validator(mode="after")
    def _auto_batch_needs_a_budget(self) -> "StudyConfig":
        if self.search.auto_batch and not self.resources.use_gpu and self.resources.memory_budget_mib is None:
            raise ValueError("search.batch_size 'auto' on CPU workers needs resources.memory_budget_mib "
                             "(a CPU process has no memory ceiling to find)")
        return self

    @property
    def reference(self) -> Setting:
        """The fp32 yardstick: O0, no speed flags, default eps, reference batch size."""
        return Setting(opt_level="O0", batch_size=self.reference_batch_size or min(self.search.fixed_batch_sizes))


class ConfigError(ValueError):
    """A study configuration problem; the message names the file and field(s)."""


def _format_errors(error: ValidationError, source: str) -> str:
    lines = [f"invalid study configuration in {source}:"]
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "literal_error":
            message = f"{message}; got {item.get('input')!r}"
        elif item["type"] == "extra_forbidden":
            message = "unknown field"
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def parse_config(raw: dict[str, Any], source: str = "<config>") -> StudyConfig:
    """Validate a dict into a StudyConfig, then check what only the model can tell (name, preset,
    eps sites, options)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        config = StudyConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_errors(error, source)) from None
    from models.base import load_model  # local: keeps config importable without torch work

    if ".py:" in config.model.name:
        # user model files are loaded again on every Ray worker, whose working directory differs
        path, _, cls_name = config.model.name.rpartition(":")
        config.model.name = f"{Path(path).expanduser().resolve()}:{cls_name}"

    try:
        model = load_model(config.model.name, **config.model.options)
        model.arch(config.model.preset)
        eps = config.search.eps if isinstance(config.search.eps, dict) else {}
        model.resolve_eps({site: 1.0 if values == "auto" else values[0] for site, values in eps.items()})
    except ValueError as error:
        raise ConfigError(f"invalid study configuration in {source}: model: {error}") from None
    return config


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping (plain YAML keeps the last one
    silently, which would drop half of a search dimension)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> StudyConfig:
    """Read, merge ``overrides`` (dotted keys, e.g. ``{"budget.max_trials": 2}``) and validate."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"cannot read search space {str(path)!r}: {error.strerror or error}") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"search space {str(path)!r} is not valid YAML: {error}") from None
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return parse_config(raw, source=str(path))
