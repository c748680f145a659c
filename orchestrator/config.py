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

from orchestrator.settings import TF32, Checkpointing, Fusion, HalfDtype, OptLevel, Setting, SpeedFlags, tf32_value


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
    # on a CUDA device with TF32 (compute capability >= 8.0) a study searches [off, on] unless this
    # is given; elsewhere TF32 does nothing and [off] stays
    tf32: list[TF32] = Field(default_factory=lambda: ["off"], min_length=1)

    @field_validator("tf32", mode="before")
    @classmethod
    def _tf32_from_bool(cls, value: object) -> object:
        return [tf32_value(v) for v in value] if isinstance(value, list) else value

    def for_device(self, tf32_capable: bool) -> "SearchConfig":
        """The space on the training device: with TF32 there (CUDA, compute capability >= 8.0) and
        ``tf32`` not given in the YAML, both strict fp32 matmuls/convs and TF32 are searched."""
        if tf32_capable and "tf32" not in self.model_fields_set:
            return self.model_copy(update={"tf32": ["off", "on"]})
        return self

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

    def flag_values(self, name: str) -> list:
        """The searched values of speed flag ``name``; a flag this space has no field for keeps its
        default (``SpeedFlags`` is the one list of flags)."""
        return list(getattr(self, name, [SpeedFlags.model_fields[name].default]))

    def candidates(self) -> list[Setting]:
        """Every distinct setting of the grid (dtype is irrelevant at O0, so O0 appears once per
        combination of the other dimensions)."""
        if self.auto_eps:
            raise ValueError("search.eps 'auto' must be expanded first (orchestrator.doctor.expand_auto_eps)")
        flag_names = list(SpeedFlags.model_fields)
        eps_sites = sorted(self.eps)
        seen: dict[str, Setting] = {}
        for level, dtype, batch, *rest in itertools.product(
            self.opt_level, self.dtype, self.fixed_batch_sizes,
            *[self.flag_values(n) for n in flag_names], *[self.eps[s] for s in eps_sites],
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
    # interleaved reference/setting block pairs: at least profile_rounds (6 is the fewest whose
    # order-statistic interval reaches 95 % coverage), more up to profile_max_rounds while the
    # interval still straddles 1 (or PyTorch's default speedup)
    profile_rounds: int = Field(default=6, gt=0)
    profile_max_rounds: int = Field(default=10, gt=0)
    max_profiled: int = Field(default=64, gt=0)  # sample this many settings when the grid is larger
    train_samples: int = Field(default=128, gt=0)  # quality budget: training samples per trial
    checkpoint_every: int = Field(default=20, gt=0)  # steps between checkpoints in quality trials
    reference_seeds: int = Field(default=3, ge=2)  # fp32 replicates: the seed-to-seed spread
    # each trained setting repeats the first candidate_seeds reference seeds (same initialisation,
    # data order and noise draws): its drift is the mean paired difference with fp32 (1: one seed,
    # compared unpaired with the references' mean)
    candidate_seeds: int = Field(default=2, ge=1)
    max_trials: int = Field(default=6, gt=0)  # Optuna trials in stage 2
    keep_slower: bool = False  # also quality-test settings slower than the reference
    # early stopping in stage 2: at these fractions of train_samples a trial's quality is compared
    # with the fp32 references' quality after the same number of samples; a trial whose drift there
    # is more than early_stop_bands noise bands on the harmful side stops ([] = never stop early)
    early_stop_at: list[float] = Field(default_factory=lambda: [0.5])
    early_stop_bands: float = Field(default=3.0, gt=0)
    # quality is also measured at these fractions of train_samples (references and trials): the
    # quality-over-time curves, and time-to-quality
    quality_at: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75])

    @model_validator(mode="after")
    def _max_rounds(self) -> "BudgetConfig":
        if self.profile_max_rounds < self.profile_rounds:
            raise ValueError(f"profile_max_rounds ({self.profile_max_rounds}) must be >= profile_rounds "
                             f"({self.profile_rounds})")
        return self

    @model_validator(mode="after")
    def _seeds(self) -> "BudgetConfig":
        if self.candidate_seeds > self.reference_seeds:
            raise ValueError(f"candidate_seeds ({self.candidate_seeds}) cannot exceed reference_seeds "
                             f"({self.reference_seeds}): each candidate seed is paired with a reference of that seed")
        return self

    @field_validator("early_stop_at", "quality_at")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if any(not 0 < f < 1 for f in value):
            raise ValueError(f"fractions of train_samples strictly between 0 and 1; got {value}")
        return sorted(set(value))

    def _samples(self, fractions: list[float]) -> list[int]:
        return sorted({max(1, round(f * self.train_samples)) for f in fractions} - {self.train_samples})

    def rung_samples(self) -> list[int]:
        """The sample counts at which quality is measured before the end of training."""
        return sorted(set(self._samples(self.early_stop_at)) | set(self._samples(self.quality_at)))

    def stop_samples(self) -> list[int]:
        """The rungs where a trial clearly worse than fp32 may stop."""
        return self._samples(self.early_stop_at)

    def candidate_seed_list(self, seed: int) -> list[int]:
        return [seed + i for i in range(self.candidate_seeds)]

    def reference_seed_list(self, seed: int) -> list[int]:
        return [seed + i for i in range(self.reference_seeds)]


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
    # the equivalence margin: the quality loss that still counts as "the same as fp32". A number is
    # absolute (metric units), "2%" is relative to the fp32 mean; unset: band_multiplier x the fp32
    # seed-to-seed standard deviation, never below min_relative_margin x the fp32 mean
    margin: float | str | None = None
    band_multiplier: float = Field(default=1.0, gt=0)
    min_relative_margin: float = Field(default=0.01, ge=0)
    # warn before stage 2 when the fp32 seeds spread wider than this share of their mean: the
    # budget cannot see small quality losses
    max_relative_band: float = Field(default=0.05, gt=0)
    eval_batches: int | None = None  # validation batches per evaluation (None = whole val split)

    @field_validator("margin")
    @classmethod
    def _margin(cls, value: float | str | None) -> float | str | None:
        if value is None:
            return None
        from orchestrator.verdict import parse_margin

        try:
            number, _ = parse_margin(value)
        except ValueError:
            raise ValueError(f"a number (absolute) or a percentage like '2%' (relative); got {value!r}") from None
        if not number > 0:
            raise ValueError(f"must be > 0; got {value!r}")
        return value

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

    @property
    def torch_default(self) -> Setting:
        """What a user runs today: fp32 with PyTorch's own backend flags (TF32 convolutions on
        Ampere+ GPUs). A recommendation must beat it to be called faster."""
        return self.reference.model_copy(update={"flags": SpeedFlags(tf32="default")})


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
    ignored = [name for name, field in SpeedFlags.model_fields.items()
               if name not in model.supported_flags and set(config.search.flag_values(name)) != {field.default}]
    if ignored:
        raise ConfigError(
            f"invalid study configuration in {source}: " + "; ".join(
                f"search.{name}: model {model.name!r} does not honour the {name!r} speed flag (its settings would "
                f"train identically and be profiled twice); use [{SpeedFlags.model_fields[name].default}]"
                for name in ignored) + f". It honours: {', '.join(sorted(model.supported_flags))}")
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
