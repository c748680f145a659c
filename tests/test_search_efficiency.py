"""``benchmarks/search_efficiency.py`` replays stage 2's real searcher against known answers, on
made-up study_cost outputs where the fastest settings (fp16) lose quality and the bf16 ones keep
it: fastest-first trains every fp16 variant before it reaches the grid's answer, the search learns
that fp16 loses quality and gets there sooner."""
from __future__ import annotations

import itertools
import json
import statistics
import sys
from pathlib import Path

import pandas as pd
import yaml

from orchestrator.config import parse_config
from orchestrator.settings import Setting
from tests.conftest import TINY_STUDY

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import search_efficiency  # noqa: E402

REFERENCE_SSIM = {0: 0.50, 1: 0.51, 2: 0.49}
LOSS = {"fp16": -0.10, "bf16": 0.0}  # quality change against fp32, on every seed


def made_up_study_cost(folder: Path, settings: list[Setting], max_trials: int) -> None:
    """A study_cost output: stage 1 found ``settings`` faster in the order given, the grid's
    training found fp16 losing quality and bf16 keeping it."""
    search = {"opt_level": ["O0", "O1", "O2"], "dtype": ["bf16", "fp16"],
              "batch_size": sorted({s.batch_size for s in settings}),
              "eps": {"instance_norm": sorted({s.eps.get("instance_norm", 1e-5) for s in settings})}}
    config = parse_config({**TINY_STUDY, "search": search, "budget": {**TINY_STUDY["budget"], "reference_seeds": 3,
                                                                       "max_trials": max_trials}}, "made-up")
    (folder / "two-stage").mkdir(parents=True)
    (folder / "grid").mkdir()
    (folder / "two-stage" / "study.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    profile, grid = [], []
    for seed, ssim in REFERENCE_SSIM.items():
        grid.append({"row_id": f"reference:{seed}", "kind": "reference", "seed": seed, "status": "ok", "trained": 1,
                     "speedup": 1.0, "quality_ssim": ssim, "setting_key": config.reference.key(),
                     "setting_json": config.reference.model_dump_json(), **config.reference.flat()})
    for rank, setting in enumerate(settings):
        speedup = 2.0 - 0.05 * rank
        common = {"row_id": setting.key(), "kind": "candidate", "setting_key": setting.key(), "label": setting.label(),
                  "setting_json": setting.model_dump_json(), **setting.flat()}
        profile.append({**common, "profile_status": "ok", "status": "ok", "speedup": speedup,
                        "speedup_low": speedup - 0.1, "speedup_high": speedup + 0.1})
        seeds = {str(s): {"status": "ok", "quality_ssim": REFERENCE_SSIM[s] + LOSS[setting.dtype]} for s in (0, 1)}
        grid.append({**common, "status": "ok", "trained": 1, "seed": 0, "seed_results": json.dumps(seeds),
                     "quality_ssim": 0.5 + LOSS[setting.dtype], "speedup": 1.0})
    pd.DataFrame(profile).to_parquet(folder / "two-stage" / "results.parquet")
    pd.DataFrame(grid).to_parquet(folder / "grid" / "results.parquet")


def replayed(folder: Path, seeds: int) -> tuple[str, int | None, list[int | None]]:
    """(the grid's answer, fastest-first's trained settings to it, the search's per sampler seed)."""
    config, frame, survivors, known, profiled = search_efficiency.answers(folder)
    replay = search_efficiency.Replay(config, frame)
    basis = search_efficiency.quality_basis(frame, config.quality)
    rows = {row["setting_key"]: row.to_dict() for _, row in frame[frame["kind"] == "candidate"].iterrows()}
    drift = {key: search_efficiency.score_trial(row, basis)["drift_in_margins"] for key, row in rows.items()}
    by_speed = [s.key() for s in sorted(survivors, key=lambda s: -known[s.key()]["speedup"])]
    searched = [replay.trained_until_reached(search_efficiency.search_order(
        config, profiled, known, survivors, drift, seed, limit=len(survivors))) for seed in range(seeds)]
    return replay.target, replay.trained_until_reached(by_speed), searched


def test_two_fp16_losers_first(tmp_path, capsys):
    settings = [Setting(opt_level=level, dtype=dtype, batch_size=2)
                for dtype, level in [("fp16", "O2"), ("fp16", "O1"), ("bf16", "O2"), ("bf16", "O1")]]
    made_up_study_cost(tmp_path, settings, max_trials=4)
    target, fastest_first, searched = replayed(tmp_path, seeds=3)
    assert target == "O2-bf16-b2"  # the fastest setting that keeps fp32's quality
    assert fastest_first == 3  # the two fp16 losers first
    # the search also starts with the two fastest: it cannot do better here, and it gets there
    assert all(n is not None and 3 <= n <= 4 for n in searched), searched

    search_efficiency.report(tmp_path, seeds=2)
    printed = capsys.readouterr().out
    assert "the grid's recommendation (its quality, stage 1's speedups): O2-bf16-b2" in printed
    line = next(line for line in printed.splitlines() if line.startswith("settings trained to reach it"))
    assert line.split()[-3] == "3"  # fastest first's count, then the search's median


def test_the_search_leaves_a_dimension_that_loses_quality(tmp_path):
    """Eight fp16 variants are faster than every bf16 one and all lose quality: fastest-first
    trains all eight before any bf16 setting; the search learns fp16 loses and leaves it."""
    settings = [Setting(opt_level=level, dtype=dtype, batch_size=batch, eps={"instance_norm": eps} if eps != 1e-5 else {})
                for dtype, level, batch, eps in itertools.product(["fp16", "bf16"], ["O2", "O1"], [4, 2], [1e-5, 1e-3])]
    made_up_study_cost(tmp_path, settings, max_trials=6)
    target, fastest_first, searched = replayed(tmp_path, seeds=8)
    assert target == "O2-bf16-b2"  # O2-bf16-b4 ties on speed and changes more from fp32
    assert fastest_first == 11
    assert all(n is not None for n in searched), searched
    assert statistics.median(searched) < fastest_first / 1.5, searched
