"""Peak training memory of settings, measured so settings don't pollute each other.

On CUDA the caching allocator's peak is reset before and read after a few steps in the current
process (``max_memory_allocated``: tensors only, comparable across settings), one setting after
another with the cache emptied between them.

On CPU a long-lived process keeps freed pages, so a reading in the training worker would carry the
previous setting's high-water mark. The settings are measured instead in one fresh Python process
(``python -m orchestrator.memory``), in sequence, after one throw-away run that pays the process's
one-time costs: before each, freed memory is handed back to the system (``malloc_trim``) and the
kernel's peak counter is reset (``/proc/self/clear_refs``); the setting's memory is the peak
resident set while building and training it minus the resident set just before. Where the counter cannot be reset (not Linux) each setting gets a process of its own.
A setting that runs out of memory or fails is reported with that status and the others still run.

Settings, data and results cross the process boundary as JSON (the only place they are text).
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from orchestrator.config import DataConfig
from orchestrator.settings import Setting

MIB = 2**20


@dataclass
class MemoryResult:
    status: str  # ok | oom | error | diverged
    mib: float
    method: str
    reason: str = ""


def _rss_now() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _give_back_freed_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def measure_in_process(model_spec: str, model_options: dict, preset: str, data: DataConfig, setting: Setting,
                       steps: int, device: str) -> MemoryResult:
    """Build a trainer and run ``steps`` steps here. Never raises for the setting's own failure:
    running out of memory is status "oom", anything else "error", both with the reason."""
    from models.base import load_model
    from orchestrator.trainer import Trainer, is_oom

    dev = torch.device(device)
    try:
        model = load_model(model_spec, **model_options)
        model.dataset(data, "train")  # data generation happens before the baseline
        if dev.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            baseline, method = torch.cuda.memory_allocated(dev), "cuda-max-allocated"
        else:
            _give_back_freed_memory()
            baseline = _rss_now()
            method = "rss-peak-fresh-process" if _reset_peak_rss() else "rss-maxrss-fresh-process"
        trainer = Trainer(model, setting, preset=preset, data=data, device=dev)
        record = trainer.run(steps)
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else _peak_rss()
        result = MemoryResult(record.status, (peak - baseline) / MIB, method, record.reason)
        del trainer, record
        return result
    except Exception as error:  # noqa: BLE001 - recorded as the setting's status; the others go on
        status = "oom" if is_oom(error) else "error"
        return MemoryResult(status, float("nan"), "", f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")


def measure_settings(model_spec: str, model_options: dict, preset: str, data: DataConfig, settings: list[Setting],
                     steps: int = 2, device: str = "cpu", timeout: float = 900.0) -> list[MemoryResult]:
    """One ``MemoryResult`` per setting, in order. CUDA: here; CPU: one fresh process for all."""
    if not settings:
        return []
    if torch.device(device).type == "cuda":
        return [measure_in_process(model_spec, model_options, preset, data, s, steps, device) for s in settings]
    if not _reset_peak_rss():  # a monotonic peak counter: a process per setting
        return [r for s in settings
                for r in _subprocess(model_spec, model_options, preset, data, [s], steps, device, timeout)]
    return _subprocess(model_spec, model_options, preset, data, settings, steps, device, timeout)


def peak_memory_mib(model_spec: str, model_options: dict, preset: str, data: DataConfig, setting: Setting,
                    steps: int = 2, device: str = "cpu", timeout: float = 900.0) -> MemoryResult:
    """One setting (the batch finder's probes)."""
    return measure_settings(model_spec, model_options, preset, data, [setting], steps, device, timeout)[0]


def _subprocess(model_spec: str, model_options: dict, preset: str, data: DataConfig, settings: list[Setting],
                steps: int, device: str, timeout: float) -> list[MemoryResult]:
    payload = {"model": model_spec, "options": model_options, "preset": preset,
               "data": data.model_dump(mode="json"), "settings": [s.model_dump(mode="json") for s in settings],
               "steps": steps, "device": device}
    # the child must import this project even when it runs from a checkout rather than installed
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run([sys.executable, "-m", "orchestrator.memory"], input=json.dumps(payload),
                              capture_output=True, text=True, timeout=timeout * len(settings), env=env)
    except subprocess.TimeoutExpired:
        return [MemoryResult("error", float("nan"), "", f"memory process timed out after {timeout:.0f} s per setting")
                for _ in settings]
    results = [MemoryResult(**json.loads(line)) for line in done.stdout.splitlines() if line.startswith("{")]
    if len(results) < len(settings):  # the process died (the kernel's OOM killer: -9) part-way
        why = "killed (out of memory)" if done.returncode == -9 else \
            (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        status = "oom" if done.returncode == -9 else "error"
        results += [MemoryResult(status, float("nan"), "", f"memory process {why}")] * (len(settings) - len(results))
    return results


def _main() -> None:
    payload = json.loads(sys.stdin.read())
    data = DataConfig.model_validate(payload["data"])
    if len(payload["settings"]) > 1:
        # one throw-away run first: the process's one-time costs (lazily loaded kernels, primitive
        # caches, allocator arenas) would otherwise all land on the first setting measured
        measure_in_process(payload["model"], payload["options"], payload["preset"], data,
                           Setting.model_validate(payload["settings"][0]), payload["steps"], payload["device"])
    for raw in payload["settings"]:
        result = measure_in_process(payload["model"], payload["options"], payload["preset"], data,
                                    Setting.model_validate(raw), payload["steps"], payload["device"])
        if result.method.startswith("rss") and len(payload["settings"]) > 1:
            result.method = "rss-peak-shared-process (after a warm-up run; freed memory trimmed, peak counter reset per setting)"
        print(json.dumps(asdict(result)), flush=True)


if __name__ == "__main__":
    _main()
