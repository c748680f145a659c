"""Study configuration: the search-space YAML validated up front into typed objects.

Every error names the field (``search.opt_level.1``) and the allowed values, and is raised before
any Ray work starts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


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
