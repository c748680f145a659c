"""Is a setting's image quality equivalent to fp32's? Paired drift, an equivalence margin, a verdict,
and how large a drift the study could have detected.

* **Paired seeds** (common random numbers): a candidate trains with the same seeds as fp32
  references (same initialisation, data order and noise draws), so its drift is the mean of the
  paired differences ``candidate(seed s) - fp32(seed s)``: the seed-to-seed variation that both
  share cancels. The differences' spread is pooled over every trained setting (one variance, more
  degrees of freedom); a study whose settings each have one seed has no pairs to pool and falls
  back to the unpaired comparison (the seed noise of both sides stays in the drift).
* **Margin**: how much quality loss still counts as "the same" (``quality.margin``, absolute or
  relative like ``"2%"``); by default the fp32 seed-to-seed standard deviation times
  ``quality.band_multiplier``, kept between ``quality.min_relative_margin`` and
  ``quality.max_relative_band`` of the fp32 mean: a spread from 2 or 3 seeds can come out near zero
  by chance, and a spread of a fifth of the metric would call a 15 % loss "equivalent". When the
  seeds spread wider than the upper bound, the margin stays there and the verdicts say what the
  budget cannot decide.
* **Verdict** (the two one-sided tests idea, one-sided here since a drift in the better direction never
  counts against a setting): with the drift's ``confidence`` interval (90 %: each one-sided test at
  5 %), ``equivalent`` when the harmful end of the interval is inside the margin, ``worse`` when the
  whole interval is beyond it on the harmful side, ``undecided`` otherwise, with the number of seeds
  that would decide it.
* **Power**: the smallest harmful drift the design detects with 80 % power at 5 % (one-sided),
  ``(t_0.95 + t_0.80) * sd / sqrt(n)``; a study never claims "no measurable effect" when that is
  larger than the margin.

Pure numpy/scipy: no torch, no Ray, no MLflow.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import stats

CONFIDENCE = 0.90  # two one-sided tests at 5 % each
ALPHA, POWER = 0.05, 0.80


@dataclass
class Margin:
    value: float
    source: str  # how it was chosen, in words

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Drift:
    """Quality drift (setting - fp32, in the metric's own units) with its interval."""

    mean: float
    low: float
    high: float
    n: int  # seeds of the setting
    sd: float  # standard deviation of one paired difference (or of one seed, unpaired)
    df: int  # degrees of freedom behind ``sd``
    method: str  # "paired" | "unpaired"
    confidence: float = CONFIDENCE
    per_seed: dict[int, float] = field(default_factory=dict)  # paired differences by seed

    @property
    def halfwidth(self) -> float:
        return (self.high - self.low) / 2

    def as_dict(self) -> dict:
        out = asdict(self)
        out["per_seed"] = {str(k): v for k, v in self.per_seed.items()}
        return out


@dataclass
class Verdict:
    status: str  # equivalent | worse | undecided | not measured
    drift: Drift | None
    margin: Margin
    harm_high: float  # the harmful end of the interval, as harm (>= 0 means harmful)
    seeds_needed: int | None  # seeds per setting that would decide an undecided verdict
    reason: str

    def as_dict(self) -> dict:
        return {"status": self.status, "drift": self.drift.as_dict() if self.drift else None,
                "margin": self.margin.as_dict(), "harm_high": self.harm_high, "seeds_needed": self.seeds_needed,
                "reason": self.reason}


def _t(q: float, df: int) -> float:
    return float(stats.t.ppf(q, df)) if df > 0 else math.inf


def reference_spread(values: list[float]) -> tuple[float, float, int]:
    """(mean, standard deviation, n) of the fp32 references' final quality."""
    vals = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if vals.size < 2:
        raise ValueError(f"fp32 quality needs at least 2 finite reference seeds, got {vals.size}")
    return float(vals.mean()), float(vals.std(ddof=1)), int(vals.size)


def parse_margin(text: float | str) -> tuple[float, bool]:
    """``quality.margin``: (value, relative?). ``0.01`` is absolute; ``"2%"`` is 2 % of the fp32 mean."""
    if isinstance(text, str):
        body = text.strip()
        if body.endswith("%"):
            return float(body[:-1]) / 100.0, True
        return float(body), False
    return float(text), False


def choose_margin(ref_values: list[float], *, margin: float | str | None, multiplier: float,
                  min_relative: float, max_relative: float = math.inf) -> Margin:
    mean, sd, n = reference_spread(ref_values)
    if margin is not None:
        value, relative = parse_margin(margin)
        if relative:
            return Margin(value * abs(mean), f"quality.margin {value:.1%} of the fp32 mean {mean:.4g}")
        return Margin(value, f"quality.margin {value:g}")
    spread = multiplier * sd
    floor, ceiling = min_relative * abs(mean), max_relative * abs(mean)
    few = f"; {n} seeds' spread is not trusted alone" if n < 3 else ""
    if spread < floor:
        return Margin(floor, f"quality.min_relative_margin: {min_relative:.1%} of the fp32 mean (the {n} seeds' "
                             f"spread, {sd:.2g}, is smaller{few})")
    if spread > ceiling:
        return Margin(ceiling, f"quality.max_relative_band: {max_relative:.1%} of the fp32 mean (the {n} seeds "
                               f"spread {sd:.2g}, wider: this budget cannot tell losses that small from noise{few})")
    return Margin(spread, f"{multiplier:g} x the fp32 seed-to-seed standard deviation over {n} seeds{few}")


def paired_differences(candidate: dict[int, float], references: dict[int, float]) -> dict[int, float]:
    """candidate(s) - fp32(s) for every seed both have (finite values only)."""
    return {s: float(candidate[s]) - float(references[s]) for s in sorted(candidate)
            if s in references and math.isfinite(candidate[s]) and math.isfinite(references[s])}


def pooled_sd(all_differences: list[list[float]]) -> tuple[float, int]:
    """One standard deviation of the paired differences pooled over settings: (sd, degrees of freedom).
    Settings with one seed contribute nothing (no spread to measure)."""
    squares, df = 0.0, 0
    for diffs in all_differences:
        if len(diffs) >= 2:
            arr = np.asarray(diffs, dtype=float)
            squares += float(((arr - arr.mean()) ** 2).sum())
            df += len(arr) - 1
    return (math.sqrt(squares / df), df) if df else (math.nan, 0)


def paired_drift(candidate: dict[int, float], references: dict[int, float], *, pooled: tuple[float, int],
                 confidence: float = CONFIDENCE) -> Drift:
    """The mean paired difference with a t-interval on the pooled spread; unpaired when nothing pools."""
    diffs = paired_differences(candidate, references)
    sd, df = pooled
    if not diffs or df == 0:
        return unpaired_drift(candidate, references, confidence=confidence)
    n = len(diffs)
    mean = float(np.mean(list(diffs.values())))
    half = _t(0.5 + confidence / 2, df) * sd / math.sqrt(n)
    return Drift(mean, mean - half, mean + half, n, sd, df, "paired", confidence, diffs)


def unpaired_drift(candidate: dict[int, float], references: dict[int, float], *,
                   confidence: float = CONFIDENCE) -> Drift:
    """mean(candidate) - mean(fp32 references), with the references' seed spread standing in for the
    candidate's own (its seed noise stays in the drift)."""
    values = [v for v in candidate.values() if math.isfinite(v)]
    ref_mean, ref_sd, n_ref = reference_spread(list(references.values()))
    if not values:
        return Drift(math.nan, math.nan, math.nan, 0, ref_sd, n_ref - 1, "unpaired", confidence)
    n = len(values)
    mean = float(np.mean(values)) - ref_mean
    half = _t(0.5 + confidence / 2, n_ref - 1) * ref_sd * math.sqrt(1 / n + 1 / n_ref)
    return Drift(mean, mean - half, mean + half, n, ref_sd, n_ref - 1, "unpaired", confidence,
                 paired_differences(candidate, references))


def detectable_drift(sd: float, n: int, df: int, method: str = "paired", n_ref: int | None = None) -> float:
    """Smallest harmful drift detected with 80 % power at 5 % (one-sided) by this design."""
    if not (math.isfinite(sd) and n > 0 and df > 0):
        return math.inf
    scale = math.sqrt(1 / n + 1 / n_ref) if method == "unpaired" and n_ref else 1 / math.sqrt(n)
    return (_t(1 - ALPHA, df) + _t(POWER, df)) * sd * scale


def judge(drift: Drift | None, margin: Margin, direction: int) -> Verdict:
    """equivalent / worse / undecided for a drift interval against ``margin`` (``direction`` +1:
    higher is better)."""
    if drift is None or not math.isfinite(drift.mean):
        return Verdict("not measured", drift, margin, math.nan, None, "no finite quality to compare")
    # as harm (positive = quality lost): the interval's two ends swap when higher is better
    harm_low, harm_high = sorted((-direction * drift.low, -direction * drift.high))
    if harm_high <= margin.value:
        status, reason = "equivalent", (f"the {drift.confidence:.0%} interval of its drift loses at most "
                                        f"{max(harm_high, 0):.4g}, inside the margin {margin.value:.4g}")
    elif harm_low > margin.value:
        status, reason = "worse", (f"the whole {drift.confidence:.0%} interval loses more than the margin "
                                   f"{margin.value:.4g} (at least {harm_low:.4g})")
    else:
        status, reason = "undecided", (f"the {drift.confidence:.0%} interval [{harm_low:+.4g}, {harm_high:+.4g}] "
                                       f"of the loss straddles the margin {margin.value:.4g}")
    needed = seeds_to_decide(drift, margin, direction) if status == "undecided" else None
    if needed is not None:
        reason += f"; about {needed} seeds per setting would decide it"
    return Verdict(status, drift, margin, harm_high, needed, reason)


def seeds_to_decide(drift: Drift, margin: Margin, direction: int, limit: int = 1000) -> int | None:
    """Seeds whose interval (same spread, same observed drift) would end inside or beyond the margin."""
    harm = -direction * drift.mean
    gap = abs(margin.value - harm)
    if not (math.isfinite(drift.sd) and drift.sd > 0) or gap == 0:
        return None
    z = float(stats.norm.ppf(0.5 + drift.confidence / 2))
    for n in range(max(drift.n, 1) + 1, limit + 1):
        df = max(drift.df + (n - drift.n), 1) if drift.method == "paired" else max(n - 1, 1)
        t = _t(0.5 + drift.confidence / 2, df) if df < 200 else z
        if t * drift.sd / math.sqrt(n) < gap:
            return n
    return None
