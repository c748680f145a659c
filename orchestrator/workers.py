"""What runs on each Ray Train worker: stage-1 profiling and stage-2 quality training.

Both loops checkpoint what they have finished after every unit of work (a profiled setting; a
chunk of training steps; a finished seed), so when Ray Train restarts a lost worker group from the
latest checkpoint the loop continues where it stopped and nothing is measured twice. The finished
results travel back to the driver as the loop's return value (rank 0's).
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch

from models.base import load_model
from orchestrator import interrupts
from orchestrator.config import StudyConfig
from orchestrator.data.check import DataError
from orchestrator.measure import ProfileResult, paired_profile
from orchestrator.memory import measure_settings
from orchestrator.quality import QualityMeter
from orchestrator.recommend import Band, stops_early
from orchestrator.schedule import Pause, training_schedule
from orchestrator.service import SAMPLES_FILE
from orchestrator.settings import Setting
from orchestrator.trainer import Trainer, is_oom

PROGRESS_FILE = "progress.json"


def _quiet_ray_train() -> None:
    """Ray Train logs every report at INFO under a logger named by its file path (so
    ``LoggingConfig`` misses it); our own progress lines say the same in one line."""
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _rank() -> int:
    return ray.train.get_context().get_world_rank()


def _worker_nodes() -> str:
    """The Ray node ids (short) this run's ranks are on, comma-separated: where a DDP trial ran."""
    import torch.distributed as dist

    mine = ray.get_runtime_context().get_node_id()[:12]
    everyone = [mine]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    return ",".join(sorted(set(everyone)))


def _restore_progress() -> tuple[dict[str, Any], Path | None]:
    """(progress dict, local checkpoint dir) from the latest checkpoint, if Ray restored one."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return {}, None
    local = Path(tempfile.mkdtemp(prefix="amp-restore-"))
    checkpoint.to_directory(str(local))
    progress = json.loads((local / PROGRESS_FILE).read_text())
    return progress, local


def _report(metrics: dict[str, Any], progress: dict[str, Any], trainer: Trainer | None = None,
            extra_files: dict[str, Path] | None = None) -> None:
    """Report with a checkpoint holding ``progress`` (and the trainer state): rank 0 writes it,
    every rank calls report (Ray Train requires all ranks to report)."""
    with tempfile.TemporaryDirectory(prefix="amp-ckpt-") as tmp:
        checkpoint = None
        if trainer is not None:
            trainer.save(tmp)  # collective-free; rank 0 writes
        if _rank() == 0:
            (Path(tmp) / PROGRESS_FILE).write_text(json.dumps(progress))
            for name, src in (extra_files or {}).items():
                if src.exists():
                    (Path(tmp) / name).write_bytes(src.read_bytes())
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        before = _run_snapshot() if interrupts.pause_requested() else None
        ray.train.report(metrics, checkpoint=checkpoint)
        if before is not None and checkpoint is not None:
            _wait_for_new_snapshot(before)


def _run_snapshot() -> bytes:
    """The run's checkpoint list as Ray Train's controller last wrote it (b"" before the first)."""
    storage = ray.train.get_context().get_storage()
    try:
        with storage.storage_filesystem.open_input_stream(storage.checkpoint_manager_snapshot_path) as f:
            return f.read()
    except (FileNotFoundError, OSError):
        return b""


def _wait_for_new_snapshot(before: bytes, timeout: float = 60.0) -> None:
    """Wait until the controller has recorded the checkpoint just reported.

    The controller takes a report on its next poll of the workers: a pause point right after the
    report (where a fault test interrupts the study) would otherwise race it, and a resumed run
    would not see the checkpoint. Only done when a pause is requested; a user's Ctrl-C in that
    quarter second costs at most the unit of work just finished."""
    deadline = time.monotonic() + timeout
    while _run_snapshot() == before and time.monotonic() < deadline:
        time.sleep(0.05)


def _model_and_data(study: StudyConfig):
    return load_model(study.model.name, **study.model.options), study.data


def _trainer(study: StudyConfig, setting: Setting, seed: int) -> Trainer:
    # as many intra-op threads as CPUs Ray gave this worker: more would fight other workers for
    # cores and make timings depend on whatever else runs on the node
    torch.set_num_threads(max(1, int(study.resources.cpus_per_worker)))
    model, data = _model_and_data(study)
    return Trainer(model, setting, preset=study.model.preset, data=data, seed=seed,
                   device=ray.train.torch.get_device(), prepare_model=ray.train.torch.prepare_model)


# ----------------------------------------------------------------------------- stage 1


def profile_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Profile each setting against the fp32 reference in this one worker group, then measure the
    peak memory of the reference and of every setting that ran in one fresh process
    (``orchestrator.memory``). ``config``: {"study": StudyConfig, "settings": [Setting]}."""
    _quiet_ray_train()
    study: StudyConfig = config["study"]
    settings: list[Setting] = config["settings"]
    budget = study.budget
    progress, restored_dir = _restore_progress()
    _forget(restored_dir)  # the progress is all a profile run restores
    done: dict[str, Any] = progress.get("done", {})
    reference = _trainer(study, study.reference, study.seed)
    # PyTorch's default fp32 first (when it is in the grid): its speedup is a second threshold every
    # other setting's interval must decide against (faster than what the user runs today, or not)
    settings = sorted(settings, key=lambda s: s != study.torch_default)
    for index, setting in enumerate(settings):
        key = setting.key()
        if key in done:
            continue
        decide = (1.0,)
        default_done = done.get(study.torch_default.key(), {})
        if setting != study.torch_default and math.isfinite(default_done.get("speedup", math.nan)):
            decide = (1.0, float(default_done["speedup"]))
        started = time.time()
        try:
            candidate = _trainer(study, setting, study.seed)
        except Exception as error:  # noqa: BLE001 - a setting that cannot even be built is recorded
            status = "oom" if is_oom(error) else "error"
            done[key] = {"status": status, "reason": f"{type(error).__name__}: {error}"}
        else:
            built = time.time()
            try:
                result = paired_profile(reference, candidate, steps=budget.profile_steps,
                                        rounds=budget.profile_rounds, max_rounds=budget.profile_max_rounds,
                                        warmup=budget.profile_warmup, slower_than=1.0, decide=decide)
            except DataError as error:  # a file that went bad after the up-front check: this setting's error
                result = ProfileResult(status="error", reason=str(error))
            done[key] = {**result.as_dict(), "build_seconds": built - started,
                         "profile_step_seconds": time.time() - built,  # quality training adds its step_seconds
                         # what the speed flags resolved to (optimizer impl, fusion fallbacks, affinity)
                         **{f"speed_{k}": v for k, v in candidate.speed_info.items()}}
            del candidate
        done[key].update(profile_seconds=time.time() - started, start_time=started, end_time=time.time())
        _report({"profiled": len(done), "of": len(settings)}, {"done": done})
        if _rank() == 0:
            print(f"[profile] {index + 1}/{len(settings)} {setting.label()}: {done[key].get('status')} "
                  f"speedup={done[key].get('speedup', math.nan):.3f}", flush=True)
        interrupts.pause_point("stage1")
    del reference
    _measure_memory(study, settings, done)
    return done


def _measure_memory(study: StudyConfig, settings: list[Setting], done: dict[str, Any]) -> None:
    """Peak memory of the reference and of every setting that ran, in one fresh process (rank 0
    measures; eps values cannot change memory, so settings differing only in eps share one)."""
    wanted = {"reference": study.reference} if "memory_status" not in done.get("reference", {}) else {}
    wanted.update({s.key(): s for s in settings if done.get(s.key(), {}).get("status") in ("ok", "slower")
                   and "memory_status" not in done[s.key()]})
    if not wanted:
        return
    shapes: dict[str, Setting] = {}
    for setting in wanted.values():
        shapes.setdefault(setting.model_copy(update={"eps": {}}).key(), setting.model_copy(update={"eps": {}}))
    started = time.time()
    if _rank() == 0:
        measured = dict(zip(shapes, measure_settings(study.model.name, study.model.options, study.model.preset,
                                                     study.data, list(shapes.values()),
                                                     device=str(ray.train.torch.get_device()))))
        seconds = (time.time() - started) / len(shapes)
        for key, setting in wanted.items():
            result = measured[setting.model_copy(update={"eps": {}}).key()]
            done.setdefault(key, {}).update(peak_memory_mib=result.mib, memory_method=result.method,
                                            memory_status=result.status, memory_reason=result.reason,
                                            memory_seconds=seconds)
        print(f"[profile] peak memory of {len(shapes)} settings measured in one fresh process "
              f"({time.time() - started:.0f} s)", flush=True)
    _report({"profiled": len(done), "of": len(settings)}, {"done": done})


# ----------------------------------------------------------------------------- stage 2


def save_sample_grid(fake: torch.Tensor, real: torch.Tensor, path: Path, max_images: int = 4) -> None:
    """Rows: generated above ground truth, in [-1, 1] -> PNG."""
    from PIL import Image

    n = min(max_images, fake.shape[0])
    rows = [torch.cat(list(t[:n]), dim=2) for t in (fake, real)]  # (3, H, n*W)
    grid = ((torch.cat(rows, dim=1).clamp(-1, 1) + 1) * 127.5).round().byte()
    Image.fromarray(grid.permute(1, 2, 0).cpu().numpy()).save(path)


def evaluate(trainer: Trainer, study: StudyConfig, grid_path: Path | None = None) -> dict[str, float]:
    meter = QualityMeter(study.quality.feature_network, device=trainer.device)
    for i, (fake, real) in enumerate(trainer.generate(batches=study.quality.eval_batches)):
        if i == 0 and grid_path is not None and trainer.rank == 0:
            save_sample_grid(fake, real, grid_path)
        meter.update(fake, real)
    metrics = meter.compute()
    return {f"quality_{k}": v for k, v in metrics.items()}


def evaluate_midway(trainer: Trainer, study: StudyConfig) -> dict[str, float]:
    """Quality part-way through training, without touching the training's random streams (the
    validation DataLoader draws its seed from the global generator): a run measured at its rungs
    trains exactly as one that is not."""
    devices = [trainer.device.index or 0] if trainer.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        return evaluate(trainer, study)


def _skipped_steps(record) -> int:
    return int(sum(v for logs in record.losses for k, v in logs.items() if k.startswith("skipped_")))


class SeedRun:
    """One seed of one setting trained for the quality budget: walks the schedule's pauses, measures
    quality where it says, stops early where the references show the setting clearly worse, and
    checkpoints what it did so a restarted worker continues exactly there."""

    def __init__(self, study: StudyConfig, setting: Setting, seed: int, rung_bands: dict[int, Band],
                 stop_bands: float | None, progress: dict[str, Any]):
        self.study, self.setting, self.seed = study, setting, seed
        self.rung_bands, self.stop_bands = rung_bands, stop_bands
        built = time.time()
        self.trainer = _trainer(study, setting, seed)
        self.build_seconds, self.midway_eval_seconds = time.time() - built, 0.0
        mine = progress.get("current_seed") == seed
        self.curve: list[list[float]] = progress.get("curve", []) if mine else []
        self.rung_quality: dict[str, dict[str, float]] = progress.get("rung_quality", {}) if mine else {}
        self.skipped: int = progress.get("skipped", 0) if mine else 0
        self.train_seconds: float = progress.get("train_seconds", 0.0) if mine else 0.0
        self.started_at: float = progress.get("start_time", time.time()) if mine else time.time()
        self.step_times: list[float] = []
        self.resumed_from = 0

    def resume(self, directory: Path) -> None:
        self.trainer.load(directory)
        self.resumed_from = self.trainer.step
        if _rank() == 0:
            print(f"[quality] {self.setting.label()} seed {self.seed}: resumed from the checkpoint at step "
                  f"{self.trainer.step}", flush=True)

    def progress(self, finished: dict[str, Any]) -> dict[str, Any]:
        return {"finished": finished, "current_seed": self.seed, "curve": self.curve, "skipped": self.skipped,
                "rung_quality": self.rung_quality, "train_seconds": self.train_seconds,
                "start_time": self.started_at}

    def train_to(self, pause: Pause) -> tuple[str, str]:
        """Train up to ``pause``; (status, reason) of the run so far."""
        started = time.time()
        first = self.trainer.step
        record = self.trainer.run(pause.step - self.trainer.step)
        self.train_seconds += time.time() - started
        self._progress(first, started)
        self.step_times += record.step_times
        self.skipped += _skipped_steps(record)
        if record.losses:
            means = {k: float(np.mean([logs[k] for logs in record.losses])) for k in record.losses[0]}
            self.curve.append([self.trainer.step, means.get("loss_generator", math.nan),
                               means.get("loss_discriminator", math.nan)])
        return record.status, record.reason

    def _progress(self, first_step: int, started: float) -> None:
        """One line per chunk: samples done, rate, and when this seed will be done."""
        if _rank() != 0 or self.trainer.step <= first_step:
            return
        per_step = self.setting.batch_size * self.trainer.world_size
        rate = (self.trainer.step - first_step) * per_step / max(time.time() - started, 1e-9)
        total = self.study.budget.train_samples
        left = max(0, total - self.trainer.samples_seen)
        print(f"[progress] {self.setting.label()} seed {self.seed}: {min(self.trainer.samples_seen, total)}/{total} "
              f"samples, {rate:.1f} samples/s, ETA {left / rate if rate > 0 else math.nan:.0f} s", flush=True)

    def measure(self, pause: Pause) -> dict[str, float]:
        """Quality part-way (a curve point), with the training time it took to get there."""
        key = str(pause.samples)
        if key not in self.rung_quality:
            started = time.time()
            self.rung_quality[key] = {**evaluate_midway(self.trainer, self.study),
                                      "train_seconds": self.train_seconds, "at": time.time()}
            self.midway_eval_seconds += time.time() - started
        return self.rung_quality[key]

    def stops_here(self, pause: Pause, measured: dict[str, float]) -> dict[str, Any] | None:
        band = self.rung_bands.get(pause.samples)
        if not (pause.may_stop and band is not None and self.stop_bands):
            return None
        verdict = stops_early(measured, band, self.stop_bands)
        if verdict is None:
            return None
        reason = (f"early stop after {pause.samples} of {self.study.budget.train_samples} samples: {band.metric} "
                  f"drift {verdict['drift']:+.4f} is {verdict['drift_in_bands']:.1f} bands on the harmful side of "
                  f"the fp32 references at the same point (limit {self.stop_bands:g})")
        return {**measured, **verdict, "stopped_at_samples": pause.samples, "reason": reason}

    def result(self, status: str, reason: str, early: dict[str, Any]) -> dict[str, Any]:
        trainer, per_step = self.trainer, self.setting.batch_size * self.trainer.world_size
        times = self.step_times
        return {
            "status": status, "reason": reason, "seed": self.seed, "steps": trainer.step,
            "samples": trainer.samples_seen, "train_seconds": self.train_seconds, "step_seconds": self.train_seconds,
            "run_build_seconds": self.build_seconds, "eval_seconds": self.midway_eval_seconds,
            "start_time": self.started_at, "skipped_steps": self.skipped, "curve": self.curve,
            "resumed_from_step": self.resumed_from, "world_size": trainer.world_size,
            "worker_nodes": _worker_nodes(), "rung_quality": json.dumps(self.rung_quality),
            "throughput": (len(times) * per_step / sum(times)) if times else math.nan,
            **{f"precision_{k}": v for k, v in trainer.policy.stats().items()},
            **{f"speed_{k}": v for k, v in trainer.speed_info.items()},
            **early,  # a stopped seed's quality is the one measured where it stopped
        }


def train_seeds(study: StudyConfig, setting: Setting, seeds: list[int], rung_bands: dict[int, Band],
                progress: dict[str, Any], restored_dir: Path | None, grid: Path,
                tag: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``setting`` for the quality budget once per seed and measure its quality: {seed:
    result}; the first seed's sample images go to ``grid`` (a PNG).

    ``progress`` (and ``restored_dir``, its checkpoint) is what a restarted worker group restored
    for this very work; every checkpoint this writes holds ``tag`` beside the progress, so a
    restart knows which work the checkpoint belongs to.

    The pauses come from ``orchestrator.schedule.training_schedule``: quality is measured at every
    curve point and early-stop rung (recorded as ``rung_quality`` with the training seconds spent
    by then); with ``rung_bands`` ({samples: Band}, the references' quality there) a seed whose
    drift at an early-stop rung is more than ``budget.early_stop_bands`` bands harmful stops with
    status "stopped"."""
    tag = tag or {}
    budget = study.budget
    finished: dict[str, Any] = progress.get("finished", {})
    phase = "references" if setting == study.reference else "stage2"

    for seed in seeds:
        if str(seed) in finished:
            continue
        run = SeedRun(study, setting, seed, rung_bands, budget.early_stop_bands, progress)
        if progress.get("current_seed") == seed and restored_dir is not None:
            run.resume(restored_dir)
        schedule = training_schedule(train_samples=budget.train_samples,
                                     per_step=setting.batch_size * run.trainer.world_size,
                                     checkpoint_every=budget.checkpoint_every,
                                     measure_samples=budget.rung_samples(), stop_samples=budget.stop_samples())
        status, reason, early = "ok", "", {}
        for pause in schedule:
            if pause.step <= run.trainer.step and not pause.final:
                continue  # done before a restart
            try:
                status, reason = run.train_to(pause)
            except DataError as error:  # a file that went bad after the up-front check: this run's error
                status, reason = "error", str(error)
            if status != "ok" or pause.final:
                break
            if pause.measure:
                early = run.stops_here(pause, run.measure(pause)) or {}
                if early:
                    status, reason = "stopped", early.pop("reason")
                    break
            if pause.checkpoint:
                _report({**tag, "seed": seed, "step": run.trainer.step}, {**tag, **run.progress(finished)},
                        run.trainer)
                interrupts.pause_point(phase)
        result = run.result(status, reason, early)
        if status == "ok":
            eval_started = time.time()
            result.update(evaluate(run.trainer, study, grid if seed == seeds[0] else None))
            result["eval_seconds"] += time.time() - eval_started
            if not all(math.isfinite(v) for k, v in result.items() if k.startswith("quality_") and k != "quality_psnr"):
                result["status"], result["reason"] = "diverged", "non-finite quality metrics"
        result["end_time"] = time.time()
        finished[str(seed)] = result
        progress = {"finished": finished}
        _report({**tag, "seed": seed, "done": len(finished)}, {**tag, **progress},
                extra_files={SAMPLES_FILE: grid})
        if _rank() == 0:
            q = result.get(f"quality_{study.quality.metric}", math.nan)
            print(f"[quality] {setting.label()} seed {seed}: {result['status']} {study.quality.metric}={q:.4f}"
                  + (f" ({reason})" if status == "stopped" else ""), flush=True)
        del run
    if restored_dir is not None and not grid.exists() and (restored_dir / SAMPLES_FILE).exists():
        grid.write_bytes((restored_dir / SAMPLES_FILE).read_bytes())  # drawn before the restart
    return finished


def quality_loop(config: dict[str, Any]) -> dict[str, Any]:
    """One setting's quality training as its own Ray Train run (``train_seeds``); ``config``:
    {"study": StudyConfig, "setting": Setting, "seeds": [int], "rung_bands": {int: Band}}."""
    _quiet_ray_train()
    progress, restored_dir = _restore_progress()
    with tempfile.TemporaryDirectory(prefix="amp-grid-") as tmp:
        finished = train_seeds(config["study"], config["setting"], config["seeds"], config.get("rung_bands") or {},
                               progress, restored_dir, Path(tmp) / SAMPLES_FILE)
    _forget(restored_dir)
    return finished


def _forget(restored_dir: Path | None) -> None:
    """Remove a restored checkpoint's local copy once its work is done."""
    if restored_dir is not None:
        shutil.rmtree(restored_dir, ignore_errors=True)


def _same_on_every_rank(value: Any) -> Any:
    """Rank 0's ``value`` on every rank of the worker group (DDP ranks must train the same job)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def serve_loop(config: dict[str, Any]) -> dict[str, Any]:
    """A training server: one Ray Train worker group that trains job after job from the study's
    job board (``orchestrator.service``) until the board closes, so the references and every
    stage-2 setting share one worker-group start instead of paying one each.

    Each checkpoint names its job; when Ray Train restarts a lost worker group from the latest
    checkpoint, the board hands this server the job it held, and the job continues from there. A
    job that raises (a user model's bug) fails alone: its trial is recorded as failed and the
    server takes the next job.
    ``config``: {"study": StudyConfig, "board": JobBoard handle, "server": str}."""
    _quiet_ray_train()
    study: StudyConfig = config["study"]
    board, server = config["board"], config["server"]
    progress, restored_dir = _restore_progress()
    served = 0
    while True:
        job = _same_on_every_rank(ray.get(board.take.remote(server)) if _rank() == 0 else None)
        if job is None:
            return {"served": served}
        mine = progress.get("job") == job["id"]
        with tempfile.TemporaryDirectory(prefix="amp-grid-") as tmp:
            grid = Path(tmp) / SAMPLES_FILE
            try:
                finished = train_seeds(study, job["setting"], job["seeds"], job.get("rung_bands") or {},
                                       progress if mine else {}, restored_dir if mine else None, grid,
                                       tag={"job": job["id"]})
            except Exception as error:  # noqa: BLE001 - this job's failure (its trial is recorded as failed), not the server's
                if _rank() == 0:
                    print(f"[quality] {job['setting'].label()}: failed with {type(error).__name__}: {error}",
                          flush=True)
                    ray.get(board.done.remote(server, job["id"], {}, None, error=f"{type(error).__name__}: {error}"))
            else:
                if _rank() == 0:
                    picture = grid.read_bytes() if grid.exists() else None
                    ray.get(board.done.remote(server, job["id"], finished, picture))
        _forget(restored_dir)
        progress, restored_dir, served = {}, None, served + 1
