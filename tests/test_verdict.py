"""Equivalence verdicts on planted truth.

Quality per (setting, seed) is simulated the way paired training makes it: a seed effect every
setting trained with that seed shares (initialisation, data order, noise draws), the setting's true
effect, and a little run-to-run noise. A setting that truly loses quality must come out ``worse``
where the paired design has the power and ``undecided`` (never ``equivalent``) where it has not; a
harmless one ``equivalent``; and the paired interval must be narrower than the unpaired one on the
same data. Breaking the pairing (comparing with the fp32 mean) or the verdict rule fails these.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from orchestrator.verdict import (Margin, choose_margin, detectable_drift, judge, paired_drift, pooled_sd,
                                  unpaired_drift)

SEEDS = [0, 1, 2]
HIGHER_IS_BETTER = +1


def simulate(rng, effects: dict[str, float], seeds=SEEDS, seed_sd=0.02, run_sd=0.003, base=0.50):
    shared = {s: rng.normal(0, seed_sd) for s in seeds}
    refs = {s: base + shared[s] + rng.normal(0, run_sd) for s in seeds}
    cands = {name: {s: base + shared[s] + effect + rng.normal(0, run_sd) for s in seeds}
             for name, effect in effects.items()}
    return refs, cands


def verdicts(refs, cands, margin, paired=True):
    pool = pooled_sd([[c[s] - refs[s] for s in c] for c in cands.values()]) if paired else (math.nan, 0)
    out = {}
    for name, values in cands.items():
        drift = paired_drift(values, refs, pooled=pool) if paired else unpaired_drift(values, refs)
        out[name] = judge(drift, margin, HIGHER_IS_BETTER)
    return out


EFFECTS = {"harmful": -0.03, "harmless": 0.0, "also harmless": 0.001, "better": +0.02}


def test_paired_design_with_power_finds_the_harmful_setting_and_clears_the_harmless():
    refs, cands = simulate(np.random.default_rng(1), EFFECTS)
    result = verdicts(refs, cands, Margin(0.01, "test"))
    assert result["harmful"].status == "worse", result["harmful"].reason
    assert result["harmless"].status == "equivalent", result["harmless"].reason
    assert result["also harmless"].status == "equivalent"
    assert result["better"].status == "equivalent"  # a gain never counts against a setting
    assert result["harmful"].drift.method == "paired" and result["harmful"].drift.df == 8


def test_without_power_the_harmful_setting_is_undecided_never_equivalent():
    """One seed per setting and loud seed noise: nothing pools, the unpaired interval is wide."""
    rng = np.random.default_rng(2)
    refs, cands = simulate(rng, EFFECTS, seeds=[0, 1, 2], seed_sd=0.02, run_sd=0.02)
    one_seed = {name: {0: values[0]} for name, values in cands.items()}
    result = verdicts(refs, one_seed, Margin(0.01, "test"))
    assert result["harmful"].status == "undecided", result["harmful"].reason
    assert result["harmless"].status == "undecided"
    assert result["harmful"].seeds_needed is not None and result["harmful"].seeds_needed > 1
    assert result["harmful"].drift.method == "unpaired"


def test_paired_interval_is_narrower_than_unpaired_on_the_same_planted_case():
    refs, cands = simulate(np.random.default_rng(3), EFFECTS)
    paired = verdicts(refs, cands, Margin(0.01, "test"), paired=True)
    unpaired = verdicts(refs, cands, Margin(0.01, "test"), paired=False)
    for name in EFFECTS:
        assert paired[name].drift.halfwidth < 0.5 * unpaired[name].drift.halfwidth, name
    assert unpaired["harmful"].status != "equivalent"


def test_a_harmful_setting_is_rarely_called_equivalent_over_many_studies():
    """The verdict's guarantee: a setting that truly loses exactly the margin is called equivalent
    in at most ~5 % of studies (one-sided test at 5 %), however the seeds fall."""
    rng = np.random.default_rng(4)
    margin = Margin(0.01, "test")
    called_equivalent, studies = 0, 600
    for _ in range(studies):
        refs, cands = simulate(rng, {"at the margin": -0.01, "other": 0.0, "third": 0.0}, run_sd=0.006)
        called_equivalent += verdicts(refs, cands, margin)["at the margin"].status == "equivalent"
    assert called_equivalent / studies <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / studies)


def test_detectable_drift_shrinks_with_seeds_and_pairing():
    assert detectable_drift(0.004, 3, 8) < detectable_drift(0.004, 1, 8)
    assert detectable_drift(0.004, 2, 4, "paired") < detectable_drift(0.02, 2, 2, "unpaired", n_ref=3)
    assert detectable_drift(0.01, 1, 0) == math.inf


def test_margin_default_comes_from_the_seed_spread_with_a_floor():
    spread = choose_margin([0.165, 0.123, 0.127], margin=None, multiplier=1.0, min_relative=0.01)
    assert spread.value == pytest.approx(np.std([0.165, 0.123, 0.127], ddof=1))
    # two seeds that agree by chance: their tiny spread is not trusted, the floor applies
    lucky = choose_margin([0.0199, 0.0202], margin=None, multiplier=1.0, min_relative=0.05)
    assert lucky.value == pytest.approx(0.05 * 0.02005) and "not trusted" in lucky.source
    # a spread of a fifth of the metric would call a 15 % loss equivalent: the margin stops at the cap
    wide = choose_margin([0.165, 0.123, 0.127], margin=None, multiplier=1.0, min_relative=0.01, max_relative=0.05)
    assert wide.value == pytest.approx(0.05 * np.mean([0.165, 0.123, 0.127])) and "cannot tell" in wide.source
    assert choose_margin([0.5, 0.6], margin="2%", multiplier=1, min_relative=0).value == pytest.approx(0.011)
    assert choose_margin([0.5, 0.6], margin=0.03, multiplier=1, min_relative=0).value == 0.03


def test_lower_is_better_metrics_judge_harm_the_other_way():
    refs = {0: 10.0, 1: 11.0, 2: 10.5}
    worse_fd = {0: 13.0, 1: 14.0, 2: 13.5}  # a Fréchet distance 3 higher: worse
    pool = pooled_sd([[worse_fd[s] - refs[s] for s in refs]] + [[0.01, -0.01, 0.0]])
    verdict = judge(paired_drift(worse_fd, refs, pooled=pool), Margin(0.5, "test"), direction=-1)
    assert verdict.status == "worse"
