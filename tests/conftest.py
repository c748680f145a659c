"""Shared fixtures. ``tiny_study`` runs one real tiny study (Ray, MLflow sqlite, Parquet) per test
session through the command line; every end-to-end test inspects that same study."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

TINY_STUDY = {
    "experiment": "e2e",
    "model": {"name": "pix2pixhd", "preset": "tiny"},
    "data": {"height": 32, "width": 32, "train_samples": 16, "val_samples": 8},
    "search": {"opt_level": ["O0", "O1"], "dtype": ["bf16"], "batch_size": [2, 4]},
    "reference_batch_size": 2,
    "budget": {"profile_warmup": 1, "profile_steps": 2, "profile_rounds": 2, "profile_max_rounds": 2, "train_samples": 16,
               "reference_seeds": 2, "max_trials": 2, "checkpoint_every": 4},
}


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory) -> dict:
    """{"output": folder, "space": yaml path, "process": CompletedProcess} of one finished study."""
    base = tmp_path_factory.mktemp("tiny-study")
    space = base / "study.yaml"
    space.write_text(yaml.safe_dump(TINY_STUDY))
    out = base / "out"
    done = subprocess.run([sys.executable, "run_experiment.py", "--search-space", str(space), "--output", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    return {"output": out, "space": space, "process": done}
