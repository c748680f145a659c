"""Peak training memory of one setting, measured so settings don't pollute each other.

On CUDA the caching allocator's peak is reset before and read after a few steps in the current
process (``max_memory_allocated``: tensors only, comparable across settings).

On CPU a long-lived process never returns freed pages to a clean state, so an in-process reading
would carry the previous setting's high-water mark. Each setting is therefore run for a few steps
in a fresh Python process (``python -m orchestrator.memory``), and its memory is the peak resident
set during building and training minus the resident set just before (imports and data set
excluded). On Linux the kernel's peak counter is reset at that point (``/proc/self/clear_refs``),
so import-time peaks cannot leak into the figure.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

MIB = 2**20


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


def measure_in_process(model_spec: str, model_options: dict, preset: str, data: dict, setting: dict,
                       steps: int, device: str) -> tuple[str, float, str]:
    """Build a trainer and run ``steps`` steps here; (status, MiB, method)."""
    from models.base import load_model
    from orchestrator.config import DataConfig
    from orchestrator.settings import Setting
    from orchestrator.trainer import Trainer

    model = load_model(model_spec, **model_options)
    data_cfg = DataConfig.model_validate(data)
    model.dataset(data_cfg, "train")  # data generation happens before the baseline
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        baseline, method = torch.cuda.memory_allocated(dev), "cuda-max-allocated"
    else:
        baseline = _rss_now()
        method = "rss-peak-fresh-process" if _reset_peak_rss() else "rss-maxrss-fresh-process"
    trainer = Trainer(model, Setting.model_validate(setting), preset=preset, data=data_cfg, device=dev)
    record = trainer.run(steps)
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else _peak_rss()
    return record.status, (peak - baseline) / MIB, method


def peak_memory_mib(model_spec: str, model_options: dict[str, Any], preset: str, data: dict,
                    setting: dict, steps: int = 2, device: str = "cpu",
                    timeout: float = 900.0) -> tuple[str, float, str]:
    """(status, MiB, method) for one setting. CUDA: in process; CPU: in a fresh process."""
    args = [model_spec, model_options, preset, data, setting, steps, device]
    if torch.device(device).type == "cuda":
        return measure_in_process(*args)
    # the child must import this project even when it runs from a checkout rather than installed
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run([sys.executable, "-m", "orchestrator.memory"], input=json.dumps(args),
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return "error", float("nan"), f"rss-subprocess timed out after {timeout:.0f} s"
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        status = "oom" if "out of memory" in done.stderr.lower() or done.returncode == -9 else "error"
        return status, float("nan"), f"rss-subprocess failed: {tail}"
    status, mib, method = json.loads(done.stdout.strip().splitlines()[-1])
    return status, mib, method


if __name__ == "__main__":
    print(json.dumps(measure_in_process(*json.loads(sys.stdin.read()))))
