"""The batch finder: largest fitting batch on fake models with a known memory ceiling (budget with
margin, raised OOM, limit, a failing start), probes recorded, plus one real tiny probe."""
from __future__ import annotations

import math

import pytest

from orchestrator.batch_finder import ProbeResult, find_batch_for_setting, find_max_batch, trainer_probe
from orchestrator.config import DataConfig
from orchestrator.settings import Setting


def linear_memory(base: float, per_sample: float):
    """A fake model: peak memory grows linearly with the batch; records which batches were probed."""
    seen: list[int] = []

    def probe(batch: int) -> ProbeResult:
        seen.append(batch)
        return ProbeResult(batch, "ok", base + per_sample * batch)

    probe.seen = seen
    return probe


def test_largest_batch_under_budget_with_margin():
    probe = linear_memory(50, 7)  # 500 MiB budget - 10 % = 450 -> 50 + 7b <= 450 -> b <= 57
    search = find_max_batch(probe, budget_mib=500, margin=0.1)
    assert search.batch_size == 57 and search.first_failure == 58
    assert [p.batch_size for p in search.probes] == probe.seen
    assert probe.seen[:7] == [1, 2, 4, 8, 16, 32, 64]  # doubling, then bisection
    assert len(probe.seen) <= 7 + 6
    failed = search.oom_probes
    assert failed and all(p.batch_size > 57 and p.status == "oom" and "budget" in p.reason for p in failed)
    assert all(p.fits for p in search.probes if p.batch_size <= 57)
    assert search.peak_mib == 50 + 7 * 57
    assert "batch 57" in search.describe() and search.as_dict()["batch_size"] == 57


def test_margin_is_a_safety_margin():
    probe = linear_memory(0, 10)
    assert find_max_batch(probe, budget_mib=1000, margin=0.0).batch_size == 100
    assert find_max_batch(probe, budget_mib=1000, margin=0.2).batch_size == 80


def test_raised_out_of_memory_is_recorded_not_fatal():
    ceiling = 23

    def probe(batch: int) -> ProbeResult:
        if batch > ceiling:
            raise RuntimeError(f"CUDA out of memory. Tried to allocate {batch * 64} MiB\nmore details")
        return ProbeResult(batch)

    search = find_max_batch(probe, limit=1000)
    assert search.batch_size == ceiling and search.first_failure == ceiling + 1
    ooms = search.oom_probes
    assert ooms and all(p.status == "oom" and p.reason.startswith("RuntimeError: CUDA out of memory") for p in ooms)
    assert all("\n" not in p.reason for p in ooms)


def test_memory_error_counts_as_oom():
    def probe(batch: int) -> ProbeResult:
        if batch > 3:
            raise MemoryError()
        return ProbeResult(batch)

    assert find_max_batch(probe).batch_size == 3


def test_limit_reached_and_limit_probed_exactly():
    probe = linear_memory(0, 1)
    search = find_max_batch(probe, limit=100, budget_mib=10_000)
    assert search.batch_size == 100 and search.first_failure is None
    assert probe.seen == [1, 2, 4, 8, 16, 32, 64, 100]


def test_a_failing_start_searches_below_it():
    probe = linear_memory(0, 10)
    search = find_max_batch(probe, start=16, budget_mib=55, margin=0.0)
    assert search.batch_size == 5 and probe.seen[0] == 16


def test_nothing_fits():
    search = find_max_batch(linear_memory(1000, 1), budget_mib=500)
    assert search.batch_size == 0 and search.first_failure == 1 and math.isnan(search.peak_mib)


def test_unknown_peak_with_a_budget_does_not_fit():
    search = find_max_batch(lambda b: ProbeResult(b, "ok", math.nan if b > 4 else 1.0), budget_mib=100)
    assert search.batch_size == 4
    assert [p.batch_size for p in search.oom_probes] == [8, 6, 5]
    assert all("peak memory unknown" in p.reason for p in search.oom_probes)


def test_broken_probe_raises_but_later_errors_are_recorded():
    with pytest.raises(RuntimeError, match="other than memory"):
        find_max_batch(lambda b: (_ for _ in ()).throw(KeyError("typo")))

    def probe(batch: int) -> ProbeResult:
        if batch > 8:
            raise ValueError("batch_size larger than the training samples")
        return ProbeResult(batch)

    search = find_max_batch(probe)
    assert search.batch_size == 8 and search.probes[-1].status == "error"


def test_arguments_are_checked():
    with pytest.raises(ValueError):
        find_max_batch(linear_memory(0, 1), start=0)
    with pytest.raises(ValueError):
        find_max_batch(linear_memory(0, 1), margin=1.0)
    from orchestrator.config import parse_config

    study = parse_config({"experiment": "x", "model": {"name": "pix2pixhd"}})
    with pytest.raises(ValueError, match="memory_budget_mib"):
        find_batch_for_setting(study, Setting(), device="cpu")


def test_real_tiny_probe_in_fresh_processes():
    """Two fresh-process probes of pix2pixHD tiny at 32x32: each measures a finite, positive peak,
    the data set is enlarged to hold the batch, and a generous budget lets both fit."""
    data = DataConfig(height=32, width=32, train_samples=1)
    probe = trainer_probe("pix2pixhd", {}, "tiny", data, Setting(opt_level="O0"), steps=1)
    search = find_max_batch(probe, start=1, limit=2, budget_mib=64_000)
    assert search.batch_size == 2
    assert [p.status for p in search.probes] == ["ok", "ok"], [p.reason for p in search.probes]
    assert all(math.isfinite(p.peak_mib) and p.peak_mib > 0 for p in search.probes)


def test_one_fresh_process_measures_several_settings_and_survives_a_failing_one():
    """The stage-1 memory pass: settings measured in sequence in one process (peak counter reset
    between them), a larger batch needs more, and a setting that fails is reported, not fatal."""
    from orchestrator.memory import measure_settings

    data = DataConfig(height=32, width=32, train_samples=8)
    small, large = Setting(opt_level="O0", batch_size=1), Setting(opt_level="O0", batch_size=8)
    broken = Setting(opt_level="O0", batch_size=64)  # more than the 8 samples: the trainer refuses it
    results = measure_settings("pix2pixhd", {}, "tiny", data, [small, broken, large], steps=1)
    assert [r.status for r in results] == ["ok", "error", "ok"], results
    assert "batch_size 64" in results[1].reason
    assert 0 < results[0].mib < results[2].mib
    assert "shared-process" in results[0].method
