"""Paired, interleaved timing against the reference."""
from __future__ import annotations

import itertools

import pytest

from orchestrator.measure import bootstrap_median, paired_profile, unpaired_profile
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


def test_bootstrap_interval_contains_the_median_and_is_deterministic():
    values = [1.0, 1.1, 0.9, 1.05, 0.95]
    a, b = bootstrap_median(values), bootstrap_median(values)
    assert a.low <= a.speedup <= a.high
    assert (a.low, a.high) == (b.low, b.high)


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
