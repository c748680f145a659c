"""The README's user-model example: loads by path, passes the model contract, runs through the CLI's
config validation."""
from pathlib import Path

import pytest

from models.base import load_model
from orchestrator.config import DataConfig, load_config
from tests.model_contract import LEVELS, check_resume, check_trains

ROOT = Path(__file__).resolve().parents[1]
SPEC = f"{ROOT / 'examples' / 'user_model.py'}:Colorizer"
DATA = DataConfig(height=16, width=16, train_samples=8, val_samples=4)


def test_loads_by_path():
    model = load_model(SPEC)
    assert model.name == "colorizer" and "instance_norm" in model.eps_sites


def test_bad_paths_and_classes_are_named():
    with pytest.raises(ValueError, match="nowhere.py"):
        load_model("nowhere.py:Model")
    with pytest.raises(ValueError, match="no class 'Nope'"):
        load_model(f"{ROOT / 'examples' / 'user_model.py'}:Nope")
    with pytest.raises(ValueError, match="not a models.base.GANModel"):
        load_model(f"{ROOT / 'examples' / 'user_model.py'}:Block")


@pytest.mark.parametrize("opt_level,dtype", LEVELS)
def test_trains_under_each_level(opt_level, dtype):
    check_trains(SPEC, DATA, opt_level, dtype)


def test_resumes_exactly(tmp_path):
    check_resume(SPEC, DATA, tmp_path)


def test_its_search_space_validates():
    config = load_config(ROOT / "search_spaces" / "user.yaml", {"model.name": SPEC})
    assert len(config.search.candidates()) == 12  # 3 levels x 2 batches x 2 eps
