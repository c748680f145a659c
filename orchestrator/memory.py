"""Peak training memory of one setting, measured so settings don't pollute each other.

On CUDA the caching allocator's peak is reset before and read after a few steps in the current
process (``max_memory_allocated``: tensors only, comparable across settings).

On CPU a long-lived process never returns freed pages to a clean state, so an in-process reading
would carry the previous setting's high-water mark. Each setting is therefore run for a few steps
in a fresh spawned process, and its memory is the peak resident set during those steps minus the
resident set just before the networks were built (imports and data set excluded).
"""
from __future__ import annotations

import multiprocessing as mp
import resource
import sys
from typing import Any

import psutil
import torch

MIB = 2**20


def _build_and_run(model_spec: str, model_options: dict, preset: str, data: dict, setting: dict,
                   steps: int, device: str) -> tuple[str, float]:
    """Build a trainer and run ``steps`` steps; returns (status, peak training memory in MiB)."""
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
        baseline = torch.cuda.memory_allocated(dev)
    else:
        baseline = psutil.Process().memory_info().rss
    trainer = Trainer(model, Setting.model_validate(setting), preset=preset, data=data_cfg, device=dev)
    record = trainer.run(steps)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev)
    else:
        # ru_maxrss is KiB on Linux, bytes on macOS
        scale = 1 if sys.platform == "darwin" else 1024
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return record.status, (peak - baseline) / MIB


def _child(queue, args):
    try:
        queue.put(("result", _build_and_run(*args)))
    except BaseException as error:  # noqa: BLE001 - report anything to the parent
        queue.put(("error", f"{type(error).__name__}: {error}"))


def peak_memory_mib(model_spec: str, model_options: dict[str, Any], preset: str, data: dict,
                    setting: dict, steps: int = 2, device: str = "cpu",
                    timeout: float = 600.0) -> tuple[str, float, str]:
    """(status, MiB, method) for one setting. CUDA: in process; CPU: in a fresh spawned process."""
    args = (model_spec, model_options, preset, data, setting, steps, device)
    if torch.device(device).type == "cuda":
        status, mib = _build_and_run(*args)
        return status, mib, "cuda-max-allocated"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, args), daemon=True)
    proc.start()
    try:
        kind, payload = queue.get(timeout=timeout)
    except Exception:  # noqa: BLE001 - queue.Empty or a dead child
        proc.kill()
        return "error", float("nan"), "rss-subprocess"
    finally:
        proc.join(timeout=10)
    if kind == "error":
        status = "oom" if "out of memory" in payload.lower() else "error"
        return status, float("nan"), f"rss-subprocess ({payload})"
    status, mib = payload
    return status, mib, "rss-subprocess"
