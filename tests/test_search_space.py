"""Stage 2 searches the real dimensions: every profiled setting is a point of the space, and a
proposal maps back to exactly that setting (no Ray started)."""
from __future__ import annotations

import optuna

from models.base import load_model
from orchestrator.config import load_config
from orchestrator.devices import DeviceInfo
from orchestrator.plan import candidate_grid
from orchestrator.search import SearchSpace
from search_spaces import default_path

CPU = DeviceInfo(type="cpu", name="cpu", capability=None, count=1, torch_version="x", host="h")


def test_every_grid_setting_round_trips_through_the_search_space():
    config = load_config(default_path("pix2pixhd"))
    grid = candidate_grid(config, CPU, sample=False)
    space = SearchSpace(grid, load_model("pix2pixhd").eps_sites)
    assert {"opt_level", "dtype", "batch_size", "flags.checkpointing", "eps.instance_norm"} <= set(space.dims)
    assert "flags.affinity" not in space.dims and space.fixed["flags.affinity"] is False  # one value: fixed
    for setting in grid:
        assert space.setting(space.params(setting)) == setting, setting.label()
    # the Optuna distributions accept every point (what a resumed study enters as finished trials)
    distributions = space.optuna_distributions()
    for setting in grid[:5]:
        optuna.trial.create_trial(params=space.params(setting), distributions=distributions, values=[1.0, 0.0])


def test_a_proposal_outside_the_grid_still_maps_to_a_setting():
    config = load_config(default_path("pix2pixhd"))
    grid = candidate_grid(config, CPU, sample=False)
    space = SearchSpace(grid, load_model("pix2pixhd").eps_sites)
    params = {d: values[0] for d, values in space.dims.items()}
    setting = space.setting(params)
    assert setting.opt_level == space.dims["opt_level"][0] and setting.batch_size == space.dims["batch_size"][0]
