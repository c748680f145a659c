"""Honest speed measurement: a setting timed against the fp32 reference on the same worker,
interleaved in blocks (reference, setting, setting, reference, …), after warm-up, with device
synchronisation (inside ``Trainer.run``). Speedup is the median of the paired block ratios with a
bootstrap interval, so slow drift in machine speed cancels out of every pair.

No Ray here: the same code profiles in a plain process, in a test, or on a Ray Train worker.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from orchestrator.trainer import RunRecord, Trainer, throughput


@dataclass
class SpeedEstimate:
    speedup: float  # median of paired ratios
    low: float  # bootstrap interval
    high: float
    spread: float  # interquartile range of the ratios
    ratios: list[float] = field(default_factory=list)

    def as_dict(self, prefix: str = "speedup") -> dict[str, float]:
        return {prefix: self.speedup, f"{prefix}_low": self.low, f"{prefix}_high": self.high,
                f"{prefix}_spread": self.spread}


def bootstrap_median(values: list[float], confidence: float = 0.95, resamples: int = 2000,
                     seed: int = 0) -> SpeedEstimate:
    """Median of ``values`` with a percentile-bootstrap interval (deterministic for a seed)."""
    data = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if data.size == 0:
        return SpeedEstimate(math.nan, math.nan, math.nan, math.nan, list(values))
    rng = np.random.default_rng(seed)
    medians = np.median(rng.choice(data, size=(resamples, data.size), replace=True), axis=1)
    alpha = (1 - confidence) / 2
    q1, q3 = np.percentile(data, [25, 75])
    return SpeedEstimate(
        speedup=float(np.median(data)),
        low=float(np.quantile(medians, alpha)),
        high=float(np.quantile(medians, 1 - alpha)),
        spread=float(q3 - q1),
        ratios=[float(v) for v in values],
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
                   slower_than: float | None = 1.0) -> ProfileResult:
    """Time ``candidate`` against ``reference`` in ``rounds`` interleaved block pairs.

    Block order alternates (R C, C R, R C …) so a trend in machine speed biases no side. A setting
    whose first pair is already below half the reference speed stops early (it cannot win, and
    fp16 on a CPU can be ~75x slower). ``slower_than``: a setting whose whole speedup interval lies below it is marked ``slower``."""
    result = ProfileResult(status="ok")
    warm = candidate.run(0, warmup=warmup)
    if warm.status != "ok":
        return ProfileResult(status=warm.status, reason=warm.reason, steps=warm.steps)
    reference.run(0, warmup=warmup)

    ratios, ref_times, cand_times = [], [], []
    for i in range(rounds):
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

    if ratios:
        result.speed = bootstrap_median(ratios)
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
    return bootstrap_median(ratios)
