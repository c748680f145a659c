"""Bad study configurations fail up front with the field and the allowed values named."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"experiment": "t", "model": {"name": "pix2pixhd", "preset": "tiny"}}


def error_of(raw: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, "study.yaml")
    return str(info.value)


def with_(**sections) -> dict:
    raw = {**GOOD}
    for key, value in sections.items():
        raw[key] = value
    return raw


def test_good_config_parses_and_expands_the_grid():
    config = parse_config(with_(search={"opt_level": ["O0", "O1"], "dtype": ["bf16", "fp16"],
                                        "batch_size": [2, 4], "eps": {"instance_norm": [1e-5, 1e-3]}}))
    grid = config.search.candidates()
    # O0 ignores dtype: (1 + 2) precisions x 2 batches x 2 eps values
    assert len(grid) == 12
    assert len({s.key() for s in grid}) == 12
    assert config.reference.opt_level == "O0" and config.reference.batch_size == 2


@pytest.mark.parametrize("raw,field,allowed", [
    (with_(model={"name": "nosuchgan"}), "model", "pix2pixhd"),
    (with_(search={"opt_level": ["O1", "O5"]}), "search.opt_level.1", "'O0', 'O1', 'O2' or 'O3'"),
    (with_(search={"dtype": ["fp8"]}), "search.dtype.0", "'fp16' or 'bf16'"),
    (with_(search={"batch_size": [0]}), "search.batch_size.0", "greater than 0"),
    (with_(search={"batch_size": [-4]}), "search.batch_size.0", "greater than 0"),
    (with_(search={"eps": {"instance_norm": [-1e-5]}}), "search.eps.instance_norm.0", "greater than 0"),
    (with_(search={"eps": {"no_such_site": [1e-3]}}), "model", "instance_norm"),
    (with_(model={"name": "pix2pixhd", "preset": "huge"}), "model", "tiny"),
    (with_(model={"name": "pix2pixhd", "options": {"wings": 2}}), "model", "ngf"),
    (with_(resources={"workers": 0}), "resources.workers", "greater than 0"),
    (with_(quality={"metric": "beauty"}), "quality.metric", "ssim, psnr, l1, fd"),
    (with_(data={"kind": "folder"}), "data", "data.root is required"),
    (with_(data={"heigth": 32}), "data.heigth", "unknown field"),
])
def test_each_bad_field_is_named_with_allowed_values(raw, field, allowed):
    message = error_of(raw)
    assert "study.yaml" in message
    assert field in message
    assert allowed in message


def test_unreadable_and_invalid_yaml_name_the_file(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("experiment: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml.*not valid YAML"):
        load_config(broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_a_key_given_twice_is_an_error_not_silently_dropped(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("experiment: t\nmodel: {name: pix2pixhd}\nsearch:\n  fusion: [jit]\n  fusion: [none]\n")
    with pytest.raises(ConfigError, match="twice.yaml.*'fusion' appears twice"):
        load_config(twice)


def test_overrides_are_validated_too(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    assert load_config(path, {"budget.max_trials": 2}).budget.max_trials == 2
    with pytest.raises(ConfigError, match="budget.max_trials"):
        load_config(path, {"budget.max_trials": 0})


def test_every_shipped_search_space_is_valid():
    for path in sorted((ROOT / "search_spaces").glob("*.yaml")):
        if path.stem == "user":
            continue
        load_config(path)


def test_cli_rejects_bad_config_before_any_ray_work(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(with_(search={"opt_level": ["O5"]})))
    done = subprocess.run([sys.executable, "run_experiment.py", "--search-space", str(path),
                           "--output", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert "search.opt_level.0" in done.stderr and "O5" in done.stderr
    assert not (tmp_path / "out").exists()  # nothing started, nothing written
    assert "Ray" not in done.stdout


def test_widening_a_speed_flag_the_model_ignores_is_refused_naming_model_and_flag():
    from orchestrator.config import ConfigError, parse_config

    raw = {"experiment": "x", "model": {"name": "spade"}, "search": {"fusion": ["none", "jit"]}}
    with pytest.raises(ConfigError, match=r"search\.fusion: model 'spade' does not honour the 'fusion' speed flag"):
        parse_config(raw)
    assert parse_config({**raw, "model": {"name": "pix2pixhd"}}).search.fusion == ["none", "jit"]


def test_one_definition_of_levels_dtypes_and_flags():
    """The opt levels, half dtypes and speed-flag names used everywhere come from the pydantic types."""
    from typing import get_args

    from orchestrator.config import SearchConfig
    from orchestrator.precision import HALF_DTYPES, OPT_LEVELS
    from orchestrator.settings import HalfDtype, OptLevel, SpeedFlags

    assert OPT_LEVELS == get_args(OptLevel) and set(HALF_DTYPES) == set(get_args(HalfDtype))
    flags = {name for setting in SearchConfig(checkpointing=["none", "blocks"]).candidates()
             for name in setting.flags.model_dump()}
    assert flags == set(SpeedFlags.model_fields)
