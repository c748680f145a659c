"""The Ray side of a study: cluster connection and resource checks, the stage-1 profile run, the
reference/quality training runs (Ray Train ``TorchTrainer``), and the stage-2 search (Ray Tune +
Optuna, multi-objective: speedup up, drift down).

Only this module, ``workers`` and ``study`` know about Ray.
"""
from __future__ import annotations

import json
import math
import os
import socket
import threading
from pathlib import Path
from typing import Any, Callable

import ray
import ray.train
import ray.tune
from ray.train.torch import TorchTrainer

from orchestrator import interrupts
from orchestrator.config import ResourcesConfig, StudyConfig
from orchestrator.results import combine_seed_results
from orchestrator.settings import Setting
from orchestrator.workers import SAMPLES_FILE, profile_loop, quality_loop

PENALTY_DRIFT = 1e3  # finite stand-in for "diverged / not measurable" (Optuna rejects NaN)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect(address: str | None, num_cpus: int | None = None) -> str:
    """Connect to ``address`` (an existing cluster) or start a local Ray; returns a description.

    A local Ray gets its dashboard on a free loopback port, and its processes are told that address
    (``RAY_API_SERVER_ADDRESS``): Ray Train's placement-group cleaner polls the state API there, and
    left to find "the" local Ray by itself it fails with "Found multiple active Ray instances" as
    soon as a second study runs on the same machine."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # worker lines are the study's progress: never fold "similar" ones (seed 0 / seed 1) together
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if ray.is_initialized():
        return "existing Ray session"
    # Ray Train's print patch would echo every worker print twice on the driver
    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_TRAIN_V2_ENABLED": "1", "RAY_DEDUP_LOGS": "0"}
    env.update({k: os.environ[k] for k in (interrupts.PAUSE_AT, interrupts.PAUSE_FILE) if k in os.environ})
    kwargs: dict[str, Any] = {}
    if address is None:
        port = _free_port()
        env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        kwargs = {"num_cpus": num_cpus, "dashboard_host": "127.0.0.1", "dashboard_port": port}
    interrupts.pause_point("ray-start")
    ray.init(address=address, log_to_driver=True, configure_logging=True, logging_level="WARNING",
             runtime_env={"env_vars": env}, **kwargs)
    interrupts.reinstall()
    return address or "local Ray"


def session_dir() -> str:
    """This Ray session's directory (its logs; every process of the session names it)."""
    try:
        return ray._private.worker._global_node.get_session_dir_path()
    except AttributeError:  # connected as a client, or not started
        return ""


def cluster_tracking_uri(uri_file: str | os.PathLike | None = None) -> str | None:
    """The MLflow server this cluster's head runs, or None when there is none.

    ``scripts/start_mlflow_server.sh`` (run by the head commands of ``cluster.yaml``) writes its URI
    to ``$AMP_MLFLOW_DIR/tracking_uri`` (default ``~/amp-mlflow/tracking_uri``) on the head, where
    the study driver runs, and also exports it as ``MLFLOW_TRACKING_URI`` from ``~/.bashrc``; this
    file finds it for processes that did not source ``~/.bashrc``."""
    if uri_file is None:
        uri_file = Path(os.environ.get("AMP_MLFLOW_DIR", "~/amp-mlflow")) / "tracking_uri"
    try:
        uri = Path(uri_file).expanduser().read_text().strip()
    except OSError:
        return None
    return uri or None


def _scaling(resources: ResourcesConfig) -> ray.train.ScalingConfig:
    per_worker = {"CPU": resources.cpus_per_worker}
    if resources.gpus_per_worker:
        per_worker["GPU"] = resources.gpus_per_worker
    return ray.train.ScalingConfig(num_workers=resources.workers, use_gpu=resources.use_gpu,
                                   resources_per_worker=per_worker, placement_strategy=resources.placement)


def run_interruptibly(fit: Callable[[], Any]) -> Any:
    """Call ``fit`` (a Tune or Train ``fit``) so that Ctrl-C stops the study at once.

    In the main thread Ray installs its own SIGINT handlers: Tune ends the run "gracefully" and
    returns, Train aborts the run and leaves a handler behind that later calls ``sys.exit(0)``;
    either way the driver carried on to the next stage (or exited 0) as if nothing happened. Off
    the main thread neither installs a handler, so the interrupt reaches the study as a plain
    ``KeyboardInterrupt``; everything finished so far is already in ``results.parquet`` and in
    Ray Train's checkpoints, which is what ``--resume`` continues from."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fit()
        except BaseException as error:  # noqa: BLE001 - re-raised in the calling thread
            outcome["error"] = error

    thread = threading.Thread(target=target, name="ray-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        interrupts.check()  # an interrupt a library swallowed still stops the study
        thread.join(0.2)  # a short join keeps the main thread able to take KeyboardInterrupt
    interrupts.reinstall()
    interrupts.check()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _fit(loop: Callable, config: dict[str, Any], study: StudyConfig, storage: Path, name: str) -> Any:
    """Run a TorchTrainer; a rerun with the same name resumes from its latest checkpoint."""
    trainer = TorchTrainer(
        loop, train_loop_config=config, scaling_config=_scaling(study.resources),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=2),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    result = run_interruptibly(trainer.fit)
    if result.error is not None:
        raise result.error
    return result


def run_profile(study: StudyConfig, settings: list[Setting], storage: Path, name: str = "profile") -> dict[str, Any]:
    """Stage 1 in one worker group: {setting key | "reference": profile result}."""
    config = {"study": study.model_dump(mode="json"), "settings": [s.model_dump(mode="json") for s in settings]}
    return _fit(profile_loop, config, study, storage, name).return_value


def run_training(study: StudyConfig, setting: Setting, seeds: list[int], storage: Path, name: str,
                 rung_bands: dict[int, dict] | None = None) -> tuple[dict[str, Any], Path | None]:
    """Train ``setting`` for the quality budget per seed: ({seed: result}, sample grid path).

    Quality is also measured at the budget's curve points and early-stop rungs; with ``rung_bands``
    (the references' bands there, as dicts) a seed clearly outside one at an early-stop rung stops."""
    config = {"study": study.model_dump(mode="json"), "setting": setting.model_dump(mode="json"), "seeds": seeds,
              "rungs": study.budget.rung_samples(), "stops": study.budget.stop_samples(),
              "rung_bands": {str(k): v for k, v in (rung_bands or {}).items()},
              "stop_bands": study.budget.early_stop_bands}
    result = _fit(quality_loop, config, study, storage, name)
    grid = None
    if result.checkpoint is not None:
        local = Path(result.checkpoint.path) / SAMPLES_FILE
        grid = local if local.exists() else None
    return result.return_value, grid


# ----------------------------------------------------------------------------- stage 2


def quality_trial(params: dict[str, Any], *, study_json: dict, candidates: dict[str, dict], storage: str,
                  evaluate: Callable[[dict[str, Any]], dict[str, float]],
                  rung_bands: dict[int, dict] | None = None) -> None:
    """One Tune trial: train the proposed setting for the quality budget with the references' first
    ``budget.candidate_seeds`` seeds (paired with them) and report speedup (from stage 1) and its
    quality loss against fp32. A repeated proposal reuses the finished result and costs no
    training; a setting clearly outside the references' band at an early-stop rung stops there, and
    its drift is the one measured at that rung."""
    study = StudyConfig.model_validate(study_json)
    key = params["setting"]
    setting = Setting.model_validate(candidates[key]["setting"])
    profile = candidates[key]["profile"]
    cache = Path(storage) / "trial-cache" / f"{key}.json"
    if cache.exists():
        ray.tune.report({**json.loads(cache.read_text()), "trained": 0, "repeat": 1})
        return
    finished, grid = run_training(study, setting, study.budget.candidate_seed_list(study.seed), Path(storage),
                                  name=f"quality-{key}", rung_bands=rung_bands)
    outcome = combine_seed_results(finished)
    scores = evaluate(outcome)
    metrics = {"setting_key": key, "label": setting.label(),
               **{k: v for k, v in outcome.items() if isinstance(v, (int, float, str))},
               **scores, "speedup": float(profile.get("speedup") or 0.0), "trained": 1,
               "samples_grid": str(grid) if grid else "", "curve": json.dumps(outcome.get("curve", []))}
    if not math.isfinite(metrics["drift_in_margins"]):
        metrics["drift_in_margins"] = PENALTY_DRIFT
    if outcome.get("status") not in ("ok", "stopped"):
        metrics["speedup"] = 0.0  # a diverged setting has no useful speed
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(metrics))
    ray.tune.report(metrics)


class _RowCallback(ray.tune.Callback):
    """Hands each finished trial's metrics to the study (driver side) as soon as it completes."""

    def __init__(self, on_result: Callable[[dict[str, Any]], None]):
        self.on_result = on_result

    def __getstate__(self):
        # Tune pickles its callbacks into the experiment state; the live driver object keeps the
        # function, a restored copy just has none
        return {"on_result": None}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.on_result is not None:
            self.on_result(result)


class _EnoughTrained(ray.tune.Stopper):
    """Ends the search once ``target`` trials have trained: proposals that were rejected in stage 1
    or repeat a finished setting cost nothing, so they don't use up the trial budget."""

    def __init__(self, target: int):
        self.target, self.trained = target, 0

    def __call__(self, trial_id, result):
        self.trained += int(bool(result.get("trained")))
        return True  # every trial reports exactly once

    def stop_all(self):
        return self.trained >= self.target


def run_search(study: StudyConfig, survivors: list[Setting], known: dict[str, dict], storage: Path,
               evaluate: Callable[[dict[str, Any]], dict[str, float]], on_result: Callable[[dict], None],
               previous: dict[str, list[float]] | None = None, num_trials: int | None = None,
               rung_bands: dict[int, dict] | None = None) -> None:
    """Stage 2: Optuna (multi-objective: speedup up, drift down) chooses which survivors to train.

    The space is one categorical over the survivors: stage 1 already removed the slow, diverging
    and out-of-memory corners, so no proposal is wasted on them. The fastest untried survivors are
    proposed first (the likeliest recommendation); ``previous`` ({key: [speedup, drift_in_margins]})
    are what a resumed study already trained."""
    from ray.tune.search.optuna import OptunaSearch

    num_trials = study.budget.max_trials if num_trials is None else num_trials
    if num_trials <= 0 or not survivors:
        return
    previous = previous or {}
    keys = [s.key() for s in sorted(survivors, key=lambda s: -float(known[s.key()].get("speedup") or 0.0))]
    untried = [k for k in keys if k not in previous]
    first = untried[: min(2, num_trials)]
    searcher = OptunaSearch(
        metric=["speedup", "drift_in_margins"], mode=["max", "min"], seed=study.seed,
        # previously trained keys come back from the trial cache at no cost, so Optuna learns them
        points_to_evaluate=[{"setting": k} for k in list(previous) + first] or None,
    )
    space = {"setting": ray.tune.choice(keys)}
    candidates = {s.key(): {"setting": s.model_dump(mode="json"), "profile": known[s.key()]} for s in survivors}
    trainable = ray.tune.with_parameters(quality_trial, study_json=study.model_dump(mode="json"),
                                         candidates=candidates, storage=str(storage), evaluate=evaluate,
                                         rung_bands=rung_bands)
    # proposals are cheap unless they train: allow several per trained trial
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(trainable, {"CPU": 1}),
        param_space=space,
        tune_config=ray.tune.TuneConfig(search_alg=searcher, num_samples=num_trials * 4,
                                        max_concurrent_trials=study.resources.max_concurrent_trials),
        run_config=ray.tune.RunConfig(name=f"search-{len(previous)}", storage_path=str(storage),
                                      callbacks=[_RowCallback(on_result)], stop=_EnoughTrained(num_trials),
                                      verbose=0),
    )
    run_interruptibly(tuner.fit)


# ----------------------------------------------------------------------------- the device


@ray.remote(max_retries=0)
def _probe_device(use_gpu: bool) -> dict[str, Any]:
    import torch

    from orchestrator.devices import describe_device

    return describe_device("cuda" if use_gpu and torch.cuda.is_available() else "cpu").as_dict()


def probe_device(study: StudyConfig) -> dict[str, Any]:
    """``DeviceInfo`` (as a dict) of a worker with a trial's resources: what training runs on."""
    resources = study.resources
    task = _probe_device.options(num_cpus=resources.cpus_per_worker, num_gpus=resources.gpus_per_worker)
    return run_interruptibly(lambda: ray.get(task.remote(resources.use_gpu)))


# ----------------------------------------------------------------------------- batch_size: auto


@ray.remote(max_retries=0)
def _find_batches(study_json: dict, settings_json: list[dict]) -> list[dict[str, Any]]:
    """On a worker with the trial's resources: the largest fitting batch of each setting."""
    import torch

    from orchestrator.batch_finder import find_batch_for_setting

    study = StudyConfig.model_validate(study_json)
    device = "cuda" if study.resources.use_gpu and torch.cuda.is_available() else "cpu"
    out = []
    for setting in settings_json:
        found = find_batch_for_setting(study.model.name, study.model.options, study.model.preset,
                                       study.data.model_dump(mode="json"), setting, device=device,
                                       budget_mib=study.resources.memory_budget_mib)
        out.append(found.as_dict())
    return out


def find_batches(study: StudyConfig, settings: list[Setting]) -> list[dict[str, Any]]:
    """``batch_size: auto``: one ``BatchSearch`` dict per setting (its batch size is ignored)."""
    resources = study.resources
    task = _find_batches.options(num_cpus=resources.cpus_per_worker, num_gpus=resources.gpus_per_worker)
    ref = task.remote(study.model_dump(mode="json"), [s.model_dump(mode="json") for s in settings])
    return run_interruptibly(lambda: ray.get(ref))
