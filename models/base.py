"""The small interface every GAN family implements, and the registry that finds them by name.

The trainer's step is the same for every model: for each network that has a loss (discriminator
first, when there is one, then generator), compute the loss under the precision policy's autocast
and hand it to ``PrecisionPolicy.step``. A user's model is one file implementing ``GANModel``.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from orchestrator.settings import SpeedFlags

if TYPE_CHECKING:
    from orchestrator.data.check import DataProblem

Batch = dict[str, torch.Tensor]
# Values a loss reports beside the loss itself. Return them as detached tensors (``x.detach()``),
# never ``float(x)``: on a GPU every host read of a tensor waits for all queued kernels, so the
# trainer reads every log value of many steps at once, every ``log_every`` steps.
Logs = dict[str, "torch.Tensor | float"]

# Speed flags the trainer applies to any model (optimizer, CPU pinning, memory format, TF32); the
# others (``checkpointing``, ``fusion``) work only where a model wires them into its networks/losses.
TRAINER_FLAGS = frozenset({"fused_optimizer", "affinity", "channels_last", "tf32"})


@dataclass
class Nets:
    """The networks of one model. ``discriminator`` is None for non-adversarial models
    (partial-conv inpainting); models with several discriminators put them in one ``nn.ModuleDict``."""

    generator: nn.Module
    discriminator: nn.Module | None = None
    # frozen helper networks used inside losses (e.g. VGG for the perceptual loss): the trainer moves
    # and casts them with the rest, never optimizes them
    aux: nn.ModuleDict | None = None

    def named(self) -> dict[str, nn.Module]:
        """Networks that are trained, in step order (discriminator before generator)."""
        out: dict[str, nn.Module] = {}
        if self.discriminator is not None:
            out["discriminator"] = self.discriminator
        out["generator"] = self.generator
        return out


CITYSCAPES_LABEL_NC = 35  # Cityscapes' label id count (pix2pixHD's label_nc)


class GANModel(ABC):
    """One conditional GAN family.

    Class attributes:
      name:      registry name (``--model NAME``)
      eps_sites: numerically sensitive constants and their fp32 defaults, by site name
      presets:   preset name -> architecture kwargs; must include ``tiny``, ``small``, ``paper``.
                 Every key a user may override must appear in every preset.
      supported_flags: the speed flags it honours (``TRAINER_FLAGS`` plus ``checkpointing`` and/or
                 ``fusion`` where the model wires them in)
      fp32_batch_keys: floating batch entries that are geometry, not activations (e.g. optical
                 flow in pixels): the trainer keeps them fp32 when O2/O3 cast the inputs to half,
                 where bf16 would round a 100 px flow to the nearest 0.5 px.

    Rules that keep the trainer generic:
      * losses call only ``nets.generator(...)`` / ``nets.discriminator(...)`` (never reach into
        submodules: under DDP the networks are wrapped);
      * the eps site ``adam`` (if declared) is consumed by the trainer as the optimizer's eps;
      * the returned loss may be any float dtype; the trainer casts it to fp32 before scaling;
      * log values are detached tensors, never ``float(...)`` (see ``Logs``).
    """

    name: str = ""
    eps_sites: dict[str, float] = {}
    presets: dict[str, dict[str, Any]] = {}
    fp32_batch_keys: tuple[str, ...] = ()
    # speed flags this model honours: the trainer's own plus the model-level ones it wires in
    # (``checkpointing``, ``fusion``). A study widening a flag outside this set is refused.
    supported_flags: frozenset[str] = TRAINER_FLAGS

    def __init__(self, **options: Any) -> None:
        """``options`` override preset keys (e.g. ``vgg_weights``, ``n_blocks``); see ``arch``."""
        self.options = options
        self.hparams: dict[str, Any] | None = None  # the resolved arch, set by build
        self.fusion = "none"  # the fusion speed flag (none | jit | compile), set by build of models with it

    def label_nc(self, default: int = CITYSCAPES_LABEL_NC) -> int:
        """The label channel count: the built arch's, else a user override, else ``default`` (every
        label-map preset uses the Cityscapes count)."""
        if self.hparams is not None and "label_nc" in self.hparams:
            return int(self.hparams["label_nc"])
        return int(self.options.get("label_nc", default))

    def resolve_eps(self, overrides: dict[str, float] | None) -> dict[str, float]:
        """Defaults with ``overrides`` applied; unknown site names are an error naming the allowed ones."""
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(self.eps_sites))
        if unknown:
            raise ValueError(
                f"model {self.name!r} has no eps site(s) {unknown}; allowed: {sorted(self.eps_sites)}"
            )
        return {**self.eps_sites, **overrides}

    def arch(self, preset: str) -> dict[str, Any]:
        """Architecture kwargs: the preset with the user's ``options`` applied on top."""
        if preset not in self.presets:
            raise ValueError(f"model {self.name!r} has no preset {preset!r}; allowed: {sorted(self.presets)}")
        base = dict(self.presets[preset])
        unknown = sorted(set(self.options) - set(base))
        if unknown:
            raise ValueError(f"model {self.name!r} has no option(s) {unknown}; allowed: {sorted(base)}")
        return {**base, **self.options}

    @abstractmethod
    def build(self, preset: str, eps: dict[str, float], flags: SpeedFlags) -> Nets:
        """Build the networks (fp32, on CPU); the trainer moves and casts them."""

    @abstractmethod
    def dataset(self, data_cfg: Any, split: str) -> torch.utils.data.Dataset:
        """A map-style data set of ``Batch`` dicts (unbatched tensors). ``split`` is 'train' or 'val'.
        ``data_cfg`` is an ``orchestrator.config.DataConfig``."""

    def check_data(self, data_cfg: Any) -> list[DataProblem]:
        """Everything wrong with the data ``data_cfg`` describes, found before a study starts Ray:
        ``orchestrator.data.check.DataProblem``s (empty when the data is usable), each naming its file.

        Default: build the train and val data sets through ``dataset`` (their constructors check the
        data options and a folder's layout) and, for a data set that reads files (it has a
        ``check_files()``, as the folder loaders do), open every file once: readable, expected
        channels, sizes, label ids below the model's label count. Override to add what only the
        model knows; a loader should raise ``orchestrator.data.check.DataError`` naming the file
        for a sample it cannot read during training."""
        from orchestrator.data.check import check_model_data

        return check_model_data(self, data_cfg)

    def param_groups(self, nets: Nets) -> dict[str, dict[str, Any]]:
        """Optimizer settings per network: ``{"generator": {"lr":..., "betas":...}, ...}``.
        Default: Adam lr 2e-4, betas (0.5, 0.999) for every network (pix2pixHD's)."""
        return {name: {"lr": 2e-4, "betas": (0.5, 0.999)} for name in nets.named()}

    def discriminator_loss(self, nets: Nets, batch: Batch) -> tuple[torch.Tensor, Logs]:
        """Loss of the discriminator(s). Only called when ``nets.discriminator`` is not None."""
        raise NotImplementedError(f"{type(self).__name__} has a discriminator but no discriminator_loss")

    @abstractmethod
    def generator_loss(self, nets: Nets, batch: Batch) -> tuple[torch.Tensor, Logs]:
        """Loss of the generator (video models loop over frames inside)."""

    @abstractmethod
    def samples(self, nets: Nets, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(fake, real) images in [-1, 1], shape (N, 3, H, W), for quality metrics and sample grids.
        Called under ``torch.no_grad()``."""


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, str] = {
    # name -> "module:Class"; imported lazily so a broken model cannot break the others
    "pix2pixhd": "models.pix2pixhd:Pix2PixHD",
    "spade": "models.spade:SPADE",
    "inpainting": "models.inpainting:Inpainting",
    "vid2vid": "models.vid2vid:Vid2Vid",
    "fs_vid2vid": "models.fs_vid2vid:FewShotVid2Vid",
    "wc_vid2vid": "models.wc_vid2vid:WCVid2Vid",
    "unit": "models.unit:UNIT",
    "munit": "models.munit:MUNIT",
    "funit": "models.funit:FUNIT",
    "coco_funit": "models.coco_funit:COCOFUNIT",
}


def register(name: str) -> Callable[[type[GANModel]], type[GANModel]]:
    """Class decorator for models defined outside ``models/`` (imported before use)."""

    def wrap(cls: type[GANModel]) -> type[GANModel]:
        _REGISTRY[name] = f"{cls.__module__}:{cls.__qualname__}"
        cls.name = cls.name or name
        return cls

    return wrap


def available() -> list[str]:
    """Registered model names whose module is present."""
    names = []
    for name, target in _REGISTRY.items():
        module = target.split(":")[0]
        if importlib.util.find_spec(module) is not None:
            names.append(name)
    return sorted(names)


def load_model(spec: str, **options: Any) -> GANModel:
    """A model by registry name, or a user's ``path/to/file.py:ClassName``; ``options`` go to ``arch``."""
    if ":" in spec and spec.split(":")[0].endswith(".py"):
        path_str, cls_name = spec.rsplit(":", 1)
        path = Path(path_str).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"model file {path_str!r} not found")
        mod_name = f"user_model_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        module_spec.loader.exec_module(module)
        cls = getattr(module, cls_name, None)
        if cls is None:
            raise ValueError(f"model file {path_str!r} has no class {cls_name!r}")
    else:
        if spec not in _REGISTRY:
            raise ValueError(
                f"unknown model {spec!r}; allowed: {available()} or a user model 'path/to/file.py:ClassName'"
            )
        module_name, cls_name = _REGISTRY[spec].split(":")
        cls = getattr(importlib.import_module(module_name), cls_name)
    if not (isinstance(cls, type) and issubclass(cls, GANModel)):
        raise ValueError(f"{spec!r} is not a models.base.GANModel subclass")
    model = cls(**options)
    if not model.name:
        model.name = cls.__name__.lower()
    return model
