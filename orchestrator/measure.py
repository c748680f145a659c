"""Honest speed measurement: a setting timed against the fp32 reference on the same worker,
interleaved in blocks (reference, setting, setting, reference, …), after warm-up, with device
synchronisation at block ends (inside ``Trainer.run``). Speedup is the median of the paired block
ratios, so slow drift in machine speed cancels out of every pair.

The interval is distribution-free: for n paired ratios, the order statistics ``[x(k), x(n-k+1)]``
cover the true median ratio with probability exactly ``1 - 2 * P(Binomial(n, 1/2) <= k - 1)``
whatever the noise's shape (a busy machine's timing noise has heavy tails). That coverage is
reported with every speedup: with 3 rounds the widest interval, [min, max], covers only 75 % of the
time, so 6 rounds are the least that reach 95 % (96.9 %). A bootstrap percentile interval of 3 or 4
ratios is the same [min, max] and would claim 95 % while delivering 75 % or 87.5 %.

No Ray here: the same code profiles in a plain process, in a test, or on a Ray Train worker.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from orchestrator.trainer import RunRecord, Trainer, throughput


CONFIDENCE = 0.95


@dataclass
class SpeedEstimate:
    speedup: float  # median of paired ratios
    low: float  # order-statistic interval for the median
    high: float
    spread: float  # interquartile range of the ratios
    ratios: list[float] = field(default_factory=list)
    coverage: float = math.nan  # the interval's exact coverage at this many ratios

    def as_dict(self, prefix: str = "speedup") -> dict[str, float]:
        return {prefix: self.speedup, f"{prefix}_low": self.low, f"{prefix}_high": self.high,
                f"{prefix}_spread": self.spread, f"{prefix}_coverage": self.coverage}

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


def order_statistic_coverage(n: int, k: int) -> float:
    """P(x(k) <= median <= x(n-k+1)) for n i.i.d. continuous values (k is 1-based)."""
    below = sum(math.comb(n, i) for i in range(k)) / 2**n  # P(Binomial(n, 1/2) <= k - 1)
    return 1.0 - 2.0 * below


def rounds_for(confidence: float = CONFIDENCE) -> int:
    """The fewest ratios whose widest interval, [min, max], reaches ``confidence``."""
    n = 1
    while order_statistic_coverage(n, 1) < confidence:
        n += 1
    return n


def median_interval(values: list[float], confidence: float = CONFIDENCE) -> SpeedEstimate:
    """Median of ``values`` with the narrowest order-statistic interval whose coverage is at least
    ``confidence`` (with too few values: [min, max], and its smaller coverage says so)."""
    data = np.sort(np.asarray([v for v in values if math.isfinite(v)], dtype=float))
    n = int(data.size)
    if n == 0:
        return SpeedEstimate(math.nan, math.nan, math.nan, math.nan, list(values), math.nan)
    k = 1
    while k + 1 <= (n + 1) // 2 and order_statistic_coverage(n, k + 1) >= confidence:
        k += 1
    q1, q3 = np.percentile(data, [25, 75])
    return SpeedEstimate(
        speedup=float(np.median(data)),
        low=float(data[k - 1]),
        high=float(data[n - k]),
        spread=float(q3 - q1),
        ratios=[float(v) for v in values],
        coverage=order_statistic_coverage(n, k) if n > 1 else 0.0,
    )


def ratio_of(numerator: SpeedEstimate, denominator: SpeedEstimate) -> SpeedEstimate:
    """``numerator / denominator`` for two independent speedups against the same yardstick (e.g. a
    setting vs strict fp32 over PyTorch's default vs strict fp32 = the setting vs PyTorch's default).

    The interval divides the extremes ([lo_n / hi_d, hi_n / lo_d]); both intervals hold together
    with probability at least ``cov_n + cov_d - 1`` (Bonferroni), which is the coverage reported."""
    if denominator.speedup == 1.0 and denominator.low == denominator.high == 1.0:
        return numerator
    return SpeedEstimate(
        speedup=numerator.speedup / denominator.speedup,
        low=numerator.low / denominator.high,
        high=numerator.high / denominator.low,
        spread=math.nan,
        coverage=max(0.0, numerator.coverage + denominator.coverage - 1.0),
    )


@dataclass
class ProfileResult:
    """Stage-1 outcome for one setting."""

    status: str  # ok | slower | diverged | oom
    reason: str = ""
    speed: SpeedEstimate | None = None
    throughput: float = math.nan  # samples/s of the setting (all workers)
    reference_throughput: float = math.nan
    skipped_steps: int = 0
    steps: int = 0

    def as_dict(self) -> dict:
        out = asdict(self)
        out.pop("speed")
        if self.speed is not None:
            out.update(self.speed.as_dict())
            out["speedup_ratios"] = self.speed.ratios
        return out


def _skipped(record: RunRecord) -> int:
    return int(sum(v for logs in record.losses for k, v in logs.items() if k.startswith("skipped_")))


def paired_profile(reference: Trainer, candidate: Trainer, *, steps: int, rounds: int, warmup: int,
                   slower_than: float | None = 1.0, max_rounds: int | None = None,
                   decide: tuple[float, ...] = (1.0,)) -> ProfileResult:
    """Time ``candidate`` against ``reference`` in at least ``rounds`` interleaved block pairs.

    Block order alternates (R C, C R, R C …) so a trend in machine speed biases no side. While the
    interval still contains one of the ``decide`` thresholds (1.0: faster or not; PyTorch's default
    speedup: faster than what the user runs today or not), rounds are added up to ``max_rounds``
    (a result that cannot decide stays undecided: its interval says so). A setting whose first
    pair is already below half the reference speed stops early (it cannot win, and fp16 on a CPU
    can be ~75x slower). ``slower_than``: a setting whose whole speedup interval lies below it is
    marked ``slower``."""
    max_rounds = max(rounds, max_rounds or rounds)
    result = ProfileResult(status="ok")
    warm = candidate.run(0, warmup=warmup)
    if warm.status != "ok":
        return ProfileResult(status=warm.status, reason=warm.reason, steps=warm.steps)
    reference.run(0, warmup=warmup)

    ratios, ref_times, cand_times = [], [], []
    i = 0
    while i < max_rounds:
        if i >= rounds and not any(median_interval(ratios).contains(t) for t in decide):
            break
        order = (reference, candidate) if i % 2 == 0 else (candidate, reference)
        records = {id(t): t.run(steps) for t in order}
        ref_rec, cand_rec = records[id(reference)], records[id(candidate)]
        result.steps += cand_rec.steps
        result.skipped_steps += _skipped(cand_rec)
        if cand_rec.status != "ok":
            result.status, result.reason = cand_rec.status, cand_rec.reason
            break
        ref_tp = throughput(ref_rec, reference.setting.batch_size, reference.world_size)
        cand_tp = throughput(cand_rec, candidate.setting.batch_size, candidate.world_size)
        ratios.append(cand_tp / ref_tp)
        ref_times.append(ref_tp)
        cand_times.append(cand_tp)
        if i == 0 and rounds > 1 and ratios[0] < 0.5:
            result.reason = f"first block ran at {ratios[0]:.2f}x the reference: stopped early"
            break
        i += 1

    if ratios:
        result.speed = median_interval(ratios)
        result.throughput = float(np.median(cand_times))
        result.reference_throughput = float(np.median(ref_times))
        # "slower" only when the whole interval is below the threshold: noise alone never rejects
        if result.status == "ok" and slower_than is not None and result.speed.high < slower_than:
            result.status = "slower"
    return result


def unpaired_profile(reference: Trainer, candidate: Trainer, *, steps: int, rounds: int, warmup: int) -> SpeedEstimate:
    """The naive estimate, for comparison only: all reference blocks first, then all candidate
    blocks, ratio of the two median throughputs. A drift in machine speed between the two phases
    lands entirely in the ratio; ``paired_profile`` cancels it."""
    reference.run(0, warmup=warmup)
    candidate.run(0, warmup=warmup)
    ref = [throughput(reference.run(steps), reference.setting.batch_size, reference.world_size) for _ in range(rounds)]
    cand = [throughput(candidate.run(steps), candidate.setting.batch_size, candidate.world_size) for _ in range(rounds)]
    ratios = [c / r for c, r in zip(cand, ref)]
    return median_interval(ratios)
