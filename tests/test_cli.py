"""The command line: one installed command (``amp-study``, also ``python -m orchestrator``) beside
``run_experiment.py``, ``--version``, and ``--dry-run`` on every shipped search space without Ray."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import ray

from orchestrator.__main__ import main as cli_main
from orchestrator.run import main as run_main
from orchestrator.run import resume_command

ROOT = Path(__file__).resolve().parents[1]
SPACES = sorted((ROOT / "search_spaces").glob("*.yaml"))


@pytest.mark.parametrize("space", SPACES, ids=lambda p: p.stem)
def test_dry_run_of_every_search_space_starts_no_ray(space, tmp_path, capsys):
    argv = ["--search-space", str(space), "--output", str(tmp_path / "out"), "--dry-run"]
    if space.stem == "user":
        argv += ["--model", f"{ROOT / 'examples' / 'user_model.py'}:Colorizer"]
    assert run_main(argv) == 0
    out = capsys.readouterr().out
    assert "to profile" in out and "stage 2 may train up to" in out and "estimated cost on this machine" in out
    assert not ray.is_initialized()
    assert not (tmp_path / "out").exists()  # nothing written


def test_version_and_subcommands(capsys):
    with pytest.raises(SystemExit) as done:
        cli_main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("amp-study ")
    assert cli_main(["run", "--dry-run", "--search-space", str(ROOT / "search_spaces" / "pix2pixhd.yaml")]) == 0
    assert "dry run of" in capsys.readouterr().out


def test_the_resume_command_names_the_program_that_ran():
    argv = ["--model", "spade", "--output", "old", "--set", "budget.max_trials=2"]
    assert resume_command(argv, Path("/o"), "amp-study run") == \
        "amp-study run --model spade --set budget.max_trials=2 --output /o --resume"
    assert resume_command(argv, Path("/o")).startswith("python run_experiment.py --model spade")


@pytest.mark.skipif(shutil.which("amp-study") is None, reason="the project is not installed (pip install -e .)")
def test_the_installed_command_runs():
    done = subprocess.run(["amp-study", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("amp-study ")
