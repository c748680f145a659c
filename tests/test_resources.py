"""A resource request the cluster can never satisfy fails within seconds, naming the fields."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_STUDY

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("resources,expected", [
    ({"workers": 64}, "65 CPUs per trial"),
    ({"gpus_per_worker": 1}, "GPUs per trial"),
    ({"cpus_per_worker": 64}, "no node has 64 CPUs"),
])
def test_impossible_request_fails_fast_with_a_clear_error(tmp_path, resources, expected):
    space = tmp_path / "s.yaml"
    space.write_text(yaml.safe_dump({**TINY_STUDY, "resources": resources}))
    started = time.time()
    done = subprocess.run([sys.executable, "run_experiment.py", "--search-space", str(space),
                           "--output", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert expected in done.stderr and "resources" in done.stderr
    assert not (tmp_path / "out" / "results.parquet").exists()
    assert time.time() - started < 120  # Ray start-up included; never an endless wait
