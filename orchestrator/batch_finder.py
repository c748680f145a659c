"""``batch_size: auto``: the largest batch that fits in memory for one precision setting.

The seeds' biggest wins came from the batch that lower memory allows (pix2pixHD 1.8x -> 2.25x at
2x batch). ``find_max_batch`` searches it with any probe ``batch_size -> ProbeResult``: doubling
from ``start`` until a probe fails (or ``limit``), then bisection between the last fit and the
first failure. A probe *fits* when it ran without running out of memory and, when a budget is
known, its peak stays under ``budget_mib * (1 - margin)``: the margin is head-room for what a few
probe steps don't show (allocator fragmentation, a longer run's peaks, other processes).
Out-of-memory is caught and recorded like any other failed probe, never raised.

Probes that don't pollute each other:

* CPU: there is no OOM to hit (24 GB for tiny models), so a memory budget in MiB stands in for the
  device and each probe runs in a fresh process (``orchestrator.memory.peak_memory_mib``: peak RSS
  over build + steps, imports and data set excluded) -- ``trainer_probe(..., device="cpu")``.
* CUDA: in process; before each probe the previous one's tensors are collected,
  ``torch.cuda.empty_cache()`` returns cached blocks and the peak counter is reset; the budget
  defaults to the device's free memory when the search starts.

For the study (``batch_size: auto``), per precision setting::

    from orchestrator.batch_finder import find_batch_for_setting
    search = find_batch_for_setting(study, setting, device=device)   # budget: resources.memory_budget_mib
    setting = setting.model_copy(update={"batch_size": search.batch_size})   # 0: nothing fits
"""
from __future__ import annotations

import gc
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from orchestrator.config import DataConfig, StudyConfig
from orchestrator.settings import Setting
from orchestrator.trainer import is_oom

MIB = 2**20


@dataclass
class ProbeResult:
    """What one probe measured. ``status``: ok | oom | error; ``peak_mib`` NaN when unknown."""

    batch_size: int
    status: str = "ok"
    peak_mib: float = math.nan
    reason: str = ""
    seconds: float = 0.0
    fits: bool = False  # decided by the search (status, budget, margin)


@dataclass
class BatchSearch:
    """The outcome: ``batch_size`` is the largest probed batch that fits (0 when none did)."""

    batch_size: int
    first_failure: int | None  # smallest probed batch that did not fit (None: limit reached)
    budget_mib: float | None
    margin: float
    limit: int
    probes: list[ProbeResult] = field(default_factory=list)

    @property
    def oom_probes(self) -> list[ProbeResult]:
        return [p for p in self.probes if not p.fits]

    @property
    def peak_mib(self) -> float:
        """Peak memory of the chosen batch (NaN when unknown or nothing fit)."""
        return next((p.peak_mib for p in self.probes if p.fits and p.batch_size == self.batch_size), math.nan)

    def describe(self) -> str:
        steps = ", ".join(f"{p.batch_size}:{'fit' if p.fits else p.status}" for p in self.probes)
        budget = f"{self.budget_mib:.0f} MiB x (1 - {self.margin:g})" if self.budget_mib else "device memory"
        return f"batch {self.batch_size} (budget {budget}; probes {steps})"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "describe": self.describe()}


def find_max_batch(probe: Callable[[int], ProbeResult], *, start: int = 1, limit: int = 1024,
                   budget_mib: float | None = None, margin: float = 0.1,
                   on_probe: Callable[[ProbeResult], None] | None = None) -> BatchSearch:
    """Largest batch in [start, limit] for which ``probe`` fits (see the module docstring).

    A probe that raises an out-of-memory error counts as ``oom``; any other exception as ``error``
    (also a failed probe: e.g. a batch larger than the data set). Both are recorded, not raised --
    except when the very first probe fails with a non-memory error, which means the probe itself
    is broken: that is raised as RuntimeError. Memory must grow with the batch (it does for these
    models), which is what makes bisection valid."""
    if start < 1 or limit < start:
        raise ValueError(f"need 1 <= start <= limit, got start={start}, limit={limit}")
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    threshold = budget_mib * (1 - margin) if budget_mib is not None else None
    search = BatchSearch(batch_size=0, first_failure=None, budget_mib=budget_mib, margin=margin, limit=limit)

    def run(batch: int) -> bool:
        began = time.perf_counter()
        try:
            result = probe(batch)
        except Exception as error:  # noqa: BLE001 - recorded: OOM is an answer, not a crash
            status = "oom" if is_oom(error) else "error"
            result = ProbeResult(batch, status, reason=f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        result.batch_size = batch
        result.seconds = result.seconds or time.perf_counter() - began
        result.fits = result.status == "ok"
        if result.fits and threshold is not None:
            if not math.isfinite(result.peak_mib):
                result.fits, result.reason = False, "peak memory unknown: cannot check the budget"
            elif result.peak_mib > threshold:
                result.fits, result.status = False, "oom"
                result.reason = (f"peak {result.peak_mib:.1f} MiB > {threshold:.1f} MiB "
                                 f"(budget {budget_mib:.0f} MiB minus {margin:.0%} margin)")
        search.probes.append(result)
        if on_probe is not None:
            on_probe(result)
        if not search.probes[:-1] and result.status == "error":
            raise RuntimeError(f"the batch-size probe fails at batch {batch} for a reason other than "
                               f"memory: {result.reason}")
        return result.fits

    # doubling
    good, bad, batch = 0, None, start
    while True:
        if run(batch):
            good = batch
            if batch == limit:
                break
            batch = min(batch * 2, limit)
        else:
            bad = batch
            break
    # bisection in (good, bad); good = 0 when even `start` failed (then below it)
    while bad is not None and bad - good > 1:
        middle = (good + bad) // 2
        if run(middle):
            good = middle
        else:
            bad = middle
    search.batch_size, search.first_failure = good, bad
    return search


# --------------------------------------------------------------------------- probes on a real trainer


def trainer_probe(model_spec: str, model_options: dict[str, Any], preset: str, data: DataConfig,
                  setting: Setting, *, device: str = "cpu", steps: int = 2,
                  timeout: float = 900.0) -> Callable[[int], ProbeResult]:
    """A probe that trains ``steps`` steps of ``setting`` at the given batch size and measures the
    peak memory: a fresh process on CPU, in process (with the caches emptied) on CUDA
    (``orchestrator.memory``). The synthetic data set is enlarged to hold one batch when needed."""
    from orchestrator.memory import peak_memory_mib

    def probe(batch: int) -> ProbeResult:
        probe_data = data.model_copy(update={"train_samples": max(data.train_samples, batch)})
        began = time.perf_counter()
        if torch.device(device).type == "cuda":
            _clean_cuda(device)
        try:
            result = peak_memory_mib(model_spec, model_options, preset, probe_data,
                                     setting.model_copy(update={"batch_size": batch}), steps, device, timeout)
        finally:
            if torch.device(device).type == "cuda":
                _clean_cuda(device)
        reason = (result.reason or result.method) if result.status != "ok" else ""
        return ProbeResult(batch, result.status, float(result.mib), reason, time.perf_counter() - began)

    return probe


def _clean_cuda(device: str) -> None:
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)


def find_batch_for_setting(study: StudyConfig, setting: Setting, *, device: str = "cpu", margin: float = 0.1,
                           start: int = 1, limit: int = 256, steps: int = 2,
                           on_probe: Callable[[ProbeResult], None] | None = None) -> BatchSearch:
    """``find_max_batch`` with ``trainer_probe`` for one setting of ``study`` (its ``batch_size`` is
    ignored). The budget is ``resources.memory_budget_mib``: required on CPU (the memory the run
    may use, e.g. the GPU's size being emulated); on CUDA it defaults to the device's free memory."""
    budget_mib = study.resources.memory_budget_mib
    if budget_mib is None:
        if torch.device(device).type != "cuda":
            raise ValueError("a CPU batch search needs resources.memory_budget_mib: a CPU process has no memory "
                             "ceiling to hit")
        _clean_cuda(device)
        budget_mib = torch.cuda.mem_get_info(torch.device(device))[0] / MIB
    probe = trainer_probe(study.model.name, study.model.options, study.model.preset, study.data, setting,
                          device=device, steps=steps)
    return find_max_batch(probe, start=start, limit=limit, budget_mib=budget_mib, margin=margin,
                          on_probe=on_probe)
