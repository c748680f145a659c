"""Study YAML files, one per model (data, not code). ``default_path`` finds the one for a model
whether the project runs from a checkout or is installed."""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def default_path(model: str) -> Path:
    """``search_spaces/<model>.yaml`` (a user model ``file.py:Class`` uses ``user.yaml``)."""
    name = "user" if ".py:" in model else model
    return HERE / f"{name}.yaml"
