"""One candidate training setting: the unit the study measures and recommends.

Plain data with no Ray or MLflow in it, so a user can build one by hand (or load a recommendation
file) and train with it in their own loop.
"""
from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

OptLevel = Literal["O0", "O1", "O2", "O3"]
HalfDtype = Literal["fp16", "bf16"]
Fusion = Literal["none", "jit", "compile"]
Checkpointing = Literal["none", "blocks", "all"]
# TF32 for fp32 matmuls/convolutions on CUDA: "off" is strict fp32 (the reference), "on" allows it
# everywhere, "default" leaves torch's own backend flags as torch sets them on that device (what a
# user runs today: on CUDA, TF32 convolutions but strict matmuls). No effect on a CPU.
TF32 = Literal["off", "on", "default"]


def tf32_value(value: object) -> object:
    """YAML's ``true``/``false`` mean "on"/"off"."""
    return {True: "on", False: "off"}[value] if isinstance(value, bool) else value


class SpeedFlags(BaseModel):
    """Speed techniques that do not change the arithmetic's precision."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    checkpointing: Checkpointing = "none"
    fused_optimizer: bool = False
    fusion: Fusion = "none"
    affinity: bool = False
    channels_last: bool = False
    tf32: TF32 = "off"

    @field_validator("tf32", mode="before")
    @classmethod
    def _tf32_from_bool(cls, value: object) -> object:
        return tf32_value(value)


class Setting(BaseModel):
    """A full training setting: precision, batch size, eps overrides and speed flags."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    opt_level: OptLevel = "O0"
    dtype: HalfDtype = "fp16"
    batch_size: int = Field(default=1, gt=0)
    eps: dict[str, float] = Field(default_factory=dict)
    flags: SpeedFlags = Field(default_factory=SpeedFlags)

    @model_validator(mode="before")
    @classmethod
    def _canonical_o0_dtype(cls, data):
        # dtype means nothing at O0: pin it so equal settings get equal keys
        if isinstance(data, dict) and data.get("opt_level", "O0") == "O0":
            data = {**data, "dtype": "fp16"}
        return data

    @field_validator("eps")
    @classmethod
    def _eps_positive(cls, value: dict[str, float]) -> dict[str, float]:
        for site, eps in value.items():
            if not eps > 0:
                raise ValueError(f"eps site {site!r} must be > 0, got {eps}")
        return dict(sorted(value.items()))

    @property
    def is_reference(self) -> bool:
        """True for strict fp32 training (O0, TF32 off): the yardstick for speed and quality."""
        return self.opt_level == "O0" and self.flags.tf32 == "off"

    def label(self) -> str:
        """Short human-readable name, e.g. ``O1-bf16-b4 ckpt=blocks eps.instance_norm=0.1``."""
        prec = "fp32" if self.opt_level == "O0" else f"{self.opt_level}-{self.dtype}"
        parts = [f"{prec}-b{self.batch_size}"]
        defaults = SpeedFlags()
        for name, value in self.flags.model_dump().items():
            if value != getattr(defaults, name):
                parts.append(f"{name}={value}")
        parts += [f"eps.{k}={v:g}" for k, v in self.eps.items()]
        return " ".join(parts)

    def key(self) -> str:
        """Stable id of the setting (same setting -> same key across runs and machines)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    def flat(self) -> dict[str, object]:
        """Flat dict for tables and MLflow params: eps sites become ``eps.<site>``."""
        out: dict[str, object] = {
            "opt_level": self.opt_level,
            "dtype": self.dtype if self.opt_level != "O0" else "fp32",
            "batch_size": self.batch_size,
        }
        out.update(self.flags.model_dump())
        out.update({f"eps.{k}": v for k, v in self.eps.items()})
        return out

    @classmethod
    def from_flat(cls, flat: dict[str, object]) -> "Setting":
        eps = {k[4:]: float(v) for k, v in flat.items() if k.startswith("eps.") and v is not None}
        flag_names = SpeedFlags.model_fields
        flags = {k: v for k, v in flat.items() if k in flag_names}
        dtype = flat.get("dtype", "fp16")
        return cls(
            opt_level=flat.get("opt_level", "O0"),
            dtype="fp16" if dtype == "fp32" else dtype,
            batch_size=int(flat.get("batch_size", 1)),
            eps=eps,
            flags=SpeedFlags(**flags),
        )
