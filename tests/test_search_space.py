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


def test_a_one_setting_grid_still_has_a_dimension_to_sample():
    """Tune's Optuna searcher refuses an empty space: a study with a single candidate (one opt
    level, one batch size, no flags) must still give it one dimension."""
    config = load_config(default_path("pix2pixhd"))
    grid = candidate_grid(config, CPU, sample=False)[:1]
    space = SearchSpace(grid, load_model("pix2pixhd").eps_sites)
    assert space.dims == {"opt_level": [grid[0].opt_level]}
    assert space.setting(space.params(grid[0])) == grid[0]
    assert set(space.tune_space()) == {"opt_level"}


def _searcher(known: dict[str, dict], patience: int = 5):
    """An ``_AnswerKnown`` over a real OptunaSearch on one dimension ``x`` in a, b, c."""
    import ray.tune
    from ray.tune.search.optuna import OptunaSearch

    from orchestrator.search import _AnswerKnown

    storage = optuna.storages.InMemoryStorage()  # shared as run_search shares its RDB storage
    study = optuna.create_study(study_name="s", storage=storage, directions=["maximize", "minimize"])
    inner = OptunaSearch(space={"x": ray.tune.choice(["a", "b", "c"])}, metric=["speedup", "drift"],
                         mode=["max", "min"], sampler=optuna.samplers.TPESampler(seed=0),
                         study_name="s", storage=storage)
    proposed: list[str] = []

    def untried():
        rest = [x for x in "abc" if x not in known and x not in proposed]
        return {"x": rest[0]} if rest else None

    searcher = _AnswerKnown(inner, answer=lambda p: known.get(p["x"]), untried=untried,
                            enqueue=study.enqueue_trial, on_suggest=lambda p: proposed.append(p["x"]),
                            patience=patience)
    searcher.study = study  # the test reads the trials back
    return searcher


def test_known_proposals_are_answered_and_the_search_reaches_the_untried_point():
    """Two of three points are known: every proposal the searcher hands Tune is the third, each
    known answer is a finished Optuna trial of its own, and once nothing is untried it finishes
    (a known point re-proposed under the same id would loop forever)."""
    import ray.tune

    known = {"a": {"speedup": 0.0, "drift": 1000.0}, "b": {"speedup": 1.2, "drift": 1000.0}}
    searcher = _searcher(known)
    assert searcher.suggest("t1") == {"x": "c"}
    searcher.on_trial_complete("t1", result={"speedup": 1.5, "drift": 0.0})
    known["c"] = {"speedup": 1.5, "drift": 0.0}
    assert searcher.suggest("t2") == ray.tune.search.Searcher.FINISHED
    states = [t.state for t in searcher.study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == len(states) == searcher.answered + 1
