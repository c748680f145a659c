#!/usr/bin/env python
"""Does stage 2's search earn its keep? Replays it against known answers: how many settings must be
trained before the study would recommend what an exhaustive grid recommends, for the Optuna search
(``orchestrator.search.Stage2Searcher``, exactly as a study drives it, over several sampler seeds)
and for the obvious alternative, training stage 1's survivors fastest first.

The answers come from one ``benchmarks/study_cost.py`` run: the grid's quality for every setting
(``<output>/grid/results.parquet``, with its fp32 references) and stage 1's paired speedups and
survivors (``<output>/two-stage/results.parquet``). Both strategies see the same frame; "reached"
means ``recommend()`` on the references plus the settings trained so far names the setting it names
on all of them. Nothing is trained here, so it runs in seconds.

    python benchmarks/study_cost.py --output runs/cost          # once (about an hour on 2 cores)
    python benchmarks/search_efficiency.py runs/cost [--seeds 10]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import pandas as pd
import yaml

from models.base import load_model
from orchestrator.config import StudyConfig, parse_config
from orchestrator.recommend import quality_basis, recommend, score_trial
from orchestrator.search import OBJECTIVE, PENALTY_DRIFT, Stage2Searcher, delivered_speedup
from orchestrator.settings import Setting

SPEED = ("speedup", "speedup_low", "speedup_high")


def answers(output: Path) -> tuple[StudyConfig, pd.DataFrame, list[Setting], dict[str, dict], list[Setting]]:
    """(config, frame, survivors, stage-1 profile by key, the profiled grid) of a study_cost run.
    The frame is the grid's references and its trained survivors, with stage 1's speedups."""
    config = parse_config(yaml.safe_load((output / "two-stage" / "study.yaml").read_text()), "study.yaml")
    profile = pd.read_parquet(output / "two-stage" / "results.parquet")
    profile = profile[profile["kind"] == "candidate"].set_index("setting_key")
    grid = pd.read_parquet(output / "grid" / "results.parquet")
    allowed = ("ok", "slower") if config.budget.keep_slower else ("ok",)
    profiled = [Setting.model_validate_json(j) for j in profile["setting_json"]]
    survivors = [s for s in profiled if profile.loc[s.key(), "profile_status"] in allowed]
    keep = {s.key() for s in survivors}
    frame = grid[(grid["kind"] == "reference") | grid["setting_key"].isin(keep)].copy()
    for column in SPEED:
        frame[column] = [1.0 if kind == "reference" else float(profile.loc[key, column])
                         for kind, key in zip(frame["kind"], frame["setting_key"])]
    known = {key: {"status": row["profile_status"], "speedup": row["speedup"]} for key, row in profile.iterrows()}
    return config, frame, survivors, known, profiled


class Replay:
    """``recommend()`` on the references plus a set of trained settings."""

    def __init__(self, config: StudyConfig, frame: pd.DataFrame):
        self.config, self.frame = config, frame
        self.model = load_model(config.model.name, **config.model.options).name
        self.target = self.recommended(set(frame.loc[frame["kind"] == "candidate", "setting_key"]))

    def recommended(self, trained: set[str]) -> str:
        rows = self.frame[(self.frame["kind"] == "reference") | self.frame["setting_key"].isin(trained)]
        rec = recommend(rows, model=self.model, preset=self.config.model.preset, quality=self.config.quality,
                        reference=self.config.reference, torch_default=self.config.torch_default)
        return rec["recommended"]["label"]

    def trained_until_reached(self, order) -> int | None:
        """How many settings of ``order`` (an iterable of keys, trained in turn) until the target."""
        trained: set[str] = set()
        for key in order:
            trained.add(key)
            if self.recommended(trained) == self.target:
                return len(trained)
        return None


def search_order(config: StudyConfig, profiled: list[Setting], known: dict[str, dict], survivors: list[Setting],
                 drift: dict[str, float], seed: int, limit: int):
    """The keys the Optuna search trains, in order, with the answers ``drift`` gives it."""
    cache = Path(tempfile.mkdtemp(prefix="replay-cache-"))
    eps_defaults = load_model(config.model.name, **config.model.options).eps_sites
    chooser = Stage2Searcher(config, profiled, known, survivors, eps_defaults=eps_defaults, num_trials=limit,
                             cache=cache, seed=seed)
    searcher = chooser.searcher
    searcher.set_search_properties(None, None, chooser.space.tune_space())
    for n in range(chooser.proposals * 10):
        params = searcher.suggest(f"replay-{n}")
        if not isinstance(params, dict):
            return  # the searcher has nothing untried left
        key = chooser.space.setting(params).key()
        result = {"speedup": float(known[key]["speedup"]), "drift_in_margins": min(drift[key], PENALTY_DRIFT)}
        result[OBJECTIVE] = delivered_speedup(result["speedup"], result["drift_in_margins"])
        (cache / f"{key}.json").write_text(json.dumps(result))
        searcher.on_trial_complete(f"replay-{n}", result=result)
        yield key


def report(output: Path, seeds: int = 10) -> None:
    """Print the comparison for the study_cost run in ``output``."""
    config, frame, survivors, known, profiled = answers(output.resolve())
    replay = Replay(config, frame)
    basis = quality_basis(frame, config.quality)
    rows = {row["setting_key"]: row for _, row in frame[frame["kind"] == "candidate"].iterrows()}
    drift = {key: score_trial(row.to_dict(), basis)["drift_in_margins"] for key, row in rows.items()}

    by_speed = [s.key() for s in sorted(survivors, key=lambda s: -float(known[s.key()]["speedup"] or 0.0))]
    fastest_first = replay.trained_until_reached(by_speed)
    searched = [replay.trained_until_reached(search_order(config, profiled, known, survivors, drift, seed,
                                                          limit=len(survivors)))
                for seed in range(seeds)]
    reached = [n for n in searched if n is not None]
    budget = config.budget.max_trials

    print(f"answers: {output} ({len(profiled)} profiled, {len(survivors)} survived stage 1, "
          f"trial budget {budget})")
    print(f"the grid's recommendation (its quality, stage 1's speedups): {replay.target}")
    print(f"{'':<44}{'fastest first':>14}{'Optuna search':>16}")
    median = statistics.median(reached) if reached else float("nan")
    print(f"{'settings trained to reach it':<44}{fastest_first or 'never':>14}"
          f"{f'{median:g} (median)':>16}")
    if reached:
        print(f"{'  over sampler seeds (min..max)':<44}{'':>14}{f'{min(reached)}..{max(reached)}':>16}")
    within = sum(1 for n in searched if n is not None and n <= budget)
    print(f"{f'reached within the budget of {budget}':<44}{'yes' if fastest_first and fastest_first <= budget else 'no':>14}"
          f"{f'{within} of {len(searched)} seeds':>16}")
    if fastest_first and reached:
        print(f"\ntrained settings, search / fastest first: {median / fastest_first:.2f} (median over seeds)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="a benchmarks/study_cost.py --output folder")
    parser.add_argument("--seeds", type=int, default=10, help="Optuna sampler seeds to replay the search with")
    args = parser.parse_args()
    report(args.output, args.seeds)


if __name__ == "__main__":
    main()
