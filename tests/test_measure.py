"""Paired, interleaved timing against the reference."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from orchestrator.measure import (SpeedEstimate, median_interval, order_statistic_coverage, paired_profile,
                                  ratio_of, rounds_for, unpaired_profile)
from orchestrator.settings import Setting
from orchestrator.trainer import RunRecord


class FakeTrainer:
    """Steps take ``cost`` seconds times the machine's speed factor at that moment."""

    def __init__(self, cost: float, machine, batch_size: int = 2, status_after: int | None = None):
        self.cost, self.machine = cost, machine
        self.setting = Setting(batch_size=batch_size)
        self.world_size, self.calls, self.status_after = 1, 0, status_after

    def run(self, steps: int, warmup: int = 0) -> RunRecord:
        record = RunRecord()
        for i in range(warmup + steps):
            self.calls += 1
            if self.status_after is not None and self.calls > self.status_after:
                record.status, record.reason = "diverged", "planted"
                break
            record.steps += 1
            record.losses.append({"skipped_generator": 0.0})
            if i >= warmup:
                record.step_times.append(self.cost * next(self.machine))
        return record


def test_order_statistic_coverage_is_exact():
    assert order_statistic_coverage(3, 1) == 0.75  # [min, max] of 3: the old "95 %" interval
    assert order_statistic_coverage(4, 1) == 0.875
    assert rounds_for(0.95) == 6 and order_statistic_coverage(6, 1) == pytest.approx(0.96875)
    estimate = median_interval([1.1, 1.2, 1.3, 1.4])
    assert (estimate.low, estimate.high, estimate.coverage) == (1.1, 1.4, 0.875)
    wide = median_interval(list(np.linspace(1.0, 2.0, 20)))
    assert wide.coverage >= 0.95 and 1.0 < wide.low < wide.speedup < wide.high < 2.0


def _coverage(n: int, noise: str, trials: int = 3000, truth: float = 1.0) -> tuple[float, float]:
    """(how often the interval covered the true speedup, the coverage it stated) over synthetic runs."""
    rng = np.random.default_rng(1000 + n)
    hits, stated = 0, []
    for _ in range(trials):
        if noise == "lognormal":
            ratios = truth * np.exp(rng.normal(0.0, 0.1, n))
        else:  # heavy tails: a busy machine's occasional hiccup block
            ratios = truth * np.exp(0.05 * rng.standard_t(1.5, n))
        estimate = median_interval(list(ratios))
        hits += estimate.low <= truth <= estimate.high
        stated.append(estimate.coverage)
    return hits / trials, min(stated)


@pytest.mark.parametrize("noise", ["lognormal", "heavy-tailed"])
@pytest.mark.parametrize("n", [3, 4, 6, 9, 14])
def test_interval_covers_a_known_speedup_at_its_stated_rate(n, noise):
    """Many synthetic runs with a known true speedup: the interval covers it at least as often as it
    says (3 binomial standard errors of slack), and from 6 rounds on it says at least 95 %."""
    achieved, stated = _coverage(n, noise)
    assert achieved >= stated - 3 * math.sqrt(stated * (1 - stated) / 3000)
    if n >= rounds_for(0.95):
        assert stated >= 0.95


def test_min_max_of_three_rounds_would_fail_a_95_percent_claim():
    """The control: the interval the study used to call 95 % covers the truth only ~75 % of the time."""
    achieved, stated = _coverage(3, "lognormal")
    assert stated == 0.75 and achieved < 0.95 - 0.1


def test_ratio_of_two_speedups_divides_the_extremes():
    setting = SpeedEstimate(2.0, 1.8, 2.2, 0.1, coverage=0.97)
    default = SpeedEstimate(1.5, 1.4, 1.6, 0.1, coverage=0.97)
    vs_default = ratio_of(setting, default)
    assert vs_default.speedup == pytest.approx(2.0 / 1.5)
    assert (vs_default.low, vs_default.high) == (pytest.approx(1.8 / 1.6), pytest.approx(2.2 / 1.4))
    assert vs_default.coverage == pytest.approx(0.94)


def test_rounds_are_added_until_the_interval_decides():
    undecided = itertools.cycle([0.9, 1.1])  # the truth sits on 1.0: never decides
    result = paired_profile(FakeTrainer(0.1, undecided), FakeTrainer(0.1, itertools.repeat(1.0)),
                            steps=1, rounds=6, warmup=0, max_rounds=10)
    assert len(result.speed.ratios) == 10 and result.speed.contains(1.0)
    clear = itertools.repeat(1.0)
    result = paired_profile(FakeTrainer(0.1, clear), FakeTrainer(0.05, clear), steps=1, rounds=6, warmup=0,
                            max_rounds=10)
    assert len(result.speed.ratios) == 6 and result.speed.low > 1.0
    # a second threshold (PyTorch default at 2.0x) keeps an interval around 2.0 going
    around_two = itertools.cycle([0.95, 1.05])
    result = paired_profile(FakeTrainer(0.1, around_two), FakeTrainer(0.05, itertools.repeat(1.0)), steps=1,
                            rounds=6, warmup=0, max_rounds=10, decide=(1.0, 2.0))
    assert len(result.speed.ratios) == 10


def test_paired_profile_recovers_a_planted_ratio():
    machine = itertools.repeat(1.0)
    ref, cand = FakeTrainer(0.10, machine), FakeTrainer(0.05, machine)
    result = paired_profile(ref, cand, steps=3, rounds=4, warmup=1)
    assert result.status == "ok"
    assert result.speed.speedup == pytest.approx(2.0)


def test_larger_batch_counts_samples_not_steps():
    machine = itertools.repeat(1.0)
    ref, cand = FakeTrainer(0.10, machine, batch_size=2), FakeTrainer(0.15, machine, batch_size=4)
    result = paired_profile(ref, cand, steps=2, rounds=2, warmup=0)
    assert result.speed.speedup == pytest.approx(4 / 0.15 / (2 / 0.10))


def test_clearly_slower_setting_is_marked_and_stopped_early():
    machine = itertools.repeat(1.0)
    ref, cand = FakeTrainer(0.01, machine), FakeTrainer(1.0, machine)
    result = paired_profile(ref, cand, steps=2, rounds=5, warmup=0)
    assert result.status == "slower"
    assert len(result.speed.ratios) == 1 and "stopped early" in result.reason


def test_divergence_during_profiling_is_recorded():
    machine = itertools.repeat(1.0)
    ref, cand = FakeTrainer(0.1, machine), FakeTrainer(0.1, machine, status_after=4)
    result = paired_profile(ref, cand, steps=3, rounds=3, warmup=1)
    assert result.status == "diverged" and result.reason == "planted"


def test_noise_alone_does_not_mark_an_equal_setting_slower():
    speeds = itertools.cycle([1.0, 1.03, 0.97, 1.01])
    ref, cand = FakeTrainer(0.1, speeds), FakeTrainer(0.1, speeds)
    result = paired_profile(ref, cand, steps=2, rounds=6, warmup=0)
    assert result.status == "ok"
    assert result.speed.low <= 1.0 <= result.speed.high


def drifting_machine(rate: float):
    """The machine slows down steadily (thermal throttling, a noisy neighbour arriving), with a
    little jitter: step n costs (1 + rate * n) times its nominal time."""
    import random

    rng = random.Random(0)
    n = 0
    while True:
        yield (1 + rate * n) * rng.uniform(0.98, 1.02)
        n += 1


def test_paired_timing_survives_planted_machine_drift_where_unpaired_does_not():
    truth = 1.5  # the candidate is truly 1.5x faster
    paired = paired_profile(FakeTrainer(0.15, m := drifting_machine(0.01)), FakeTrainer(0.10, m),
                            steps=4, rounds=8, warmup=1)
    unpaired = unpaired_profile(FakeTrainer(0.15, m := drifting_machine(0.01)), FakeTrainer(0.10, m),
                                steps=4, rounds=8, warmup=1)
    assert paired.speed.low <= truth <= paired.speed.high
    assert abs(paired.speed.speedup - truth) < 0.1
    # the unpaired estimate blames the machine's slowdown on the candidate, confidently
    assert not (unpaired.low <= truth <= unpaired.high)
    assert unpaired.speedup < truth - 0.3


def test_intervals_widen_when_timing_noise_grows():
    import random

    def noisy(spread):
        rng = random.Random(1)
        while True:
            yield rng.uniform(1 - spread, 1 + spread)

    calm = paired_profile(FakeTrainer(0.1, m := noisy(0.01)), FakeTrainer(0.05, m), steps=2, rounds=8, warmup=0)
    loud = paired_profile(FakeTrainer(0.1, m := noisy(0.3)), FakeTrainer(0.05, m), steps=2, rounds=8, warmup=0)
    assert (loud.speed.high - loud.speed.low) > 3 * (calm.speed.high - calm.speed.low)
