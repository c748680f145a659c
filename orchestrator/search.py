"""The Ray side of a study: cluster connection and resource checks, the stage-1 profile run, the
reference/quality training runs (Ray Train ``TorchTrainer``), and the stage-2 search (Ray Tune +
Optuna, one objective: the speedup a setting delivers at fp32's quality).

Only this module, ``workers`` and ``study`` know about Ray.
"""
from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import ray
import ray.train
import ray.tune
from ray.train.torch import TorchTrainer

from orchestrator import interrupts
from orchestrator.config import ResourcesConfig, StudyConfig
from orchestrator.recommend import Band
from orchestrator.results import combine_seed_results
from orchestrator.capacity import TRIAL_CPUS
from orchestrator.service import Trainers
from orchestrator.settings import Setting, SpeedFlags
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
    # Ray Train's print patch would echo every worker print twice on the driver. The controller
    # takes one report per worker per health check (a queue of one): at its default 2 s interval a
    # run that checkpoints often waits up to 2 s per report, which made a tiny study's 20-report
    # run take 49 s instead of 14 s
    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_TRAIN_V2_ENABLED": "1", "RAY_DEDUP_LOGS": "0",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")}
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


def fit(loop: Callable, config: dict[str, Any], study: StudyConfig, storage: Path, name: str,
        interruptible: bool = True) -> Any:
    """Run a TorchTrainer; a rerun with the same name resumes from its latest checkpoint.
    ``interruptible=False`` for a run in a thread of its own (a training server)."""
    trainer = TorchTrainer(
        loop, train_loop_config=config, scaling_config=_scaling(study.resources),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=2),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    result = run_interruptibly(trainer.fit) if interruptible else trainer.fit()
    if result.error is not None:
        raise result.error
    return result


def run_profile(study: StudyConfig, settings: list[Setting], storage: Path, name: str = "profile") -> dict[str, Any]:
    """Stage 1 in one worker group: {setting key | "reference": profile result}."""
    return fit(profile_loop, {"study": study, "settings": settings}, study, storage, name).return_value


def run_training(study: StudyConfig, setting: Setting, seeds: list[int], storage: Path, name: str,
                 rung_bands: dict[int, Band] | None = None) -> tuple[dict[str, Any], Path | None]:
    """Train ``setting`` for the quality budget per seed in a Ray Train run of its own: ({seed:
    result}, sample grid path). A study trains on its training servers instead
    (``orchestrator.service``); this is the one-run-per-setting way (the exhaustive grid of
    ``benchmarks/study_cost.py``).

    Quality is also measured at the budget's curve points and early-stop rungs; with ``rung_bands``
    (the references' bands there) a seed clearly outside one at an early-stop rung stops."""
    config = {"study": study, "setting": setting, "seeds": seeds, "rung_bands": rung_bands or {}}
    result = fit(quality_loop, config, study, storage, name)
    grid = None
    if result.checkpoint is not None:
        local = Path(result.checkpoint.path) / SAMPLES_FILE
        grid = local if local.exists() else None
    return result.return_value, grid


# ----------------------------------------------------------------------------- stage 2


# what a trial reports to Tune: the searcher's objectives and the trial's identity; the whole row
# travels as one JSON field ("row") for the study to record
TRIAL_REPORT = ("setting_key", "speedup", "drift_in_margins", "delivered_speedup", "trained", "repeat", "status")
OBJECTIVE = "delivered_speedup"
# TPE's random start-up, in Optuna trials: the two seeded fastest survivors and the proposals
# answered without training fill it; more random draws spend trained settings on nothing
# (benchmarks/search_efficiency.py: a start-up of 3 needed about twice the trained settings of 2)
TPE_STARTUP = 2


def delivered_speedup(speedup: float, drift_in_margins: float) -> float:
    """Stage 2's search objective: the speedup a setting delivers at fp32's quality. Its stage-1
    speedup when its quality loss is within the margin; discounted by the margins it loses beyond
    that (a setting one margin too lossy counts half, a diverged one nothing). Speedups are known
    for every survivor before stage 2; what the search learns is which dimensions keep quality."""
    if not math.isfinite(drift_in_margins) or drift_in_margins >= PENALTY_DRIFT:
        return 0.0
    return float(speedup) * min(1.0, 1.0 / max(drift_in_margins, 1e-12))



def quality_trial(params: dict[str, Any], *, study: StudyConfig, space: "SearchSpace", profiled: dict[str, dict],
                  survivors: set[str], storage: str, evaluate: Callable[[dict[str, Any]], dict[str, float]],
                  trainers: Trainers, rung_bands: dict[int, Band] | None = None) -> None:
    """One Tune trial: the setting Optuna proposed (``params``: one value per searched dimension).

    A survivor of stage 1 is trained for the quality budget with the references' first
    ``budget.candidate_seeds`` seeds (paired with them) by a training server (``trainers``; the trial
    itself holds a hundredth of a CPU while it waits) and reports its speedup (from stage 1) and
    quality loss against fp32; a repeat reuses the finished result. A proposal stage 1 rejected
    (slower, diverged, out of memory) or never profiled costs nothing: it reports what is known
    (its speedup if it ran, else 0, and the penalty loss) with ``trained=0``, so Optuna learns that
    corner."""
    setting = space.setting(params)
    key = setting.key()
    if key not in survivors:
        profile = profiled.get(key, {"status": "not profiled"})
        speedup = float(profile.get("speedup") or 0.0) if profile.get("status") == "slower" else 0.0
        row = {"setting_key": key, "speedup": speedup, "drift_in_margins": PENALTY_DRIFT, OBJECTIVE: 0.0,
               "trained": 0, "repeat": 0, "status": str(profile.get("status"))}
        ray.tune.report({**row, "row": json.dumps(row)})
        return
    cache = Path(storage) / "trial-cache" / f"{key}.json"
    if cache.exists():
        row = json.loads(cache.read_text())
        row[OBJECTIVE] = delivered_speedup(row["speedup"], row["drift_in_margins"])
        ray.tune.report({**{k: row[k] for k in TRIAL_REPORT if k in row}, "trained": 0, "repeat": 1,
                         "row": json.dumps(row)})
        return
    finished, grid = trainers.train(setting, study.budget.candidate_seed_list(study.seed), rung_bands)
    outcome = combine_seed_results(finished)
    row = {**{k: v for k, v in outcome.items() if isinstance(v, (int, float, str))}, **evaluate(outcome),
           "setting_key": key, "label": setting.label(), "trained": 1, "repeat": 0,
           "samples_grid": str(grid) if grid else "", "curve": json.dumps(outcome.get("curve", []))}
    # Optuna's objectives: finite numbers only (NaN would leave its trial RUNNING forever); the
    # speedup stage 1 measured, 0 for a setting that diverged
    if not math.isfinite(row["drift_in_margins"]):
        row["drift_in_margins"] = PENALTY_DRIFT
    row["speedup"] = (float(profiled[key].get("speedup") or 0.0)
                      if outcome.get("status") in ("ok", "stopped") else 0.0)
    row[OBJECTIVE] = delivered_speedup(row["speedup"], row["drift_in_margins"])
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(row))
    ray.tune.report({**{k: row[k] for k in TRIAL_REPORT}, "row": json.dumps(row)})


class SearchSpace:
    """The dimensions Optuna searches in stage 2: opt level, dtype, batch size, each eps site and
    each speed flag, with the values the profiled grid gives them (a dimension with one value is
    fixed, not searched; opt level is always searched, so a one-setting grid still gives Tune and
    Optuna a space to sample). ``setting(params)`` maps a proposal back to a setting of the grid's form
    (eps values equal to the model's default dropped, as ``plan.candidate_grid`` does)."""

    def __init__(self, grid: list[Setting], eps_defaults: dict[str, float]):
        self.eps_defaults = dict(eps_defaults)
        values: dict[str, list] = {}
        for setting in grid:
            for dim, value in self._point(setting).items():
                if value not in values.setdefault(dim, []):
                    values[dim].append(value)
        searched = {d for d, v in values.items() if len(v) > 1} | {"opt_level"}
        self.fixed = {d: v[0] for d, v in values.items() if d not in searched}
        self.dims = {d: sorted(v, key=str) for d, v in values.items() if d in searched}

    def _point(self, setting: Setting) -> dict[str, Any]:
        point: dict[str, Any] = {"opt_level": setting.opt_level, "dtype": setting.dtype,
                                 "batch_size": setting.batch_size}
        point.update({f"flags.{k}": v for k, v in setting.flags.model_dump().items()})
        point.update({f"eps.{site}": float(setting.eps.get(site, default))
                      for site, default in self.eps_defaults.items()})
        return point

    def params(self, setting: Setting) -> dict[str, Any]:
        """The proposal (searched dimensions only) that stands for ``setting``."""
        point = self._point(setting)
        return {d: point[d] for d in self.dims}

    def setting(self, params: dict[str, Any]) -> Setting:
        point = {**self.fixed, **params}
        eps = {site: float(point[f"eps.{site}"]) for site, default in self.eps_defaults.items()
               if f"eps.{site}" in point and float(point[f"eps.{site}"]) != default}
        flags = {k.removeprefix("flags."): v for k, v in point.items() if k.startswith("flags.")}
        return Setting(opt_level=point["opt_level"], dtype=point["dtype"], batch_size=int(point["batch_size"]),
                       eps=eps, flags=SpeedFlags(**flags))

    def tune_space(self) -> dict[str, Any]:
        return {d: ray.tune.choice(v) for d, v in self.dims.items()}

    def optuna_distributions(self) -> dict[str, Any]:
        import optuna

        return {d: optuna.distributions.CategoricalDistribution(v) for d, v in self.dims.items()}


class _RowCallback(ray.tune.Callback):
    """Hands each finished trial's metrics to the study (driver side) as soon as it completes, and
    tells it when a trial starts."""

    def __init__(self, on_result: Callable[[dict[str, Any]], None],
                 on_start: Callable[[str], None] | None = None, space: "SearchSpace | None" = None):
        self.on_result, self.on_start, self.space = on_result, on_start, space

    def __getstate__(self):
        # Tune pickles its callbacks into the experiment state; the live driver object keeps the
        # functions, a restored copy just has none
        return {"on_result": None, "on_start": None, "space": None}

    def on_trial_start(self, iteration, trials, trial, **info):
        if self.on_start is not None and self.space is not None:
            self.on_start(self.space.setting(trial.config).key())

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.on_result is not None:
            self.on_result(result)


class _AnswerKnown(ray.tune.search.Searcher):
    """The Optuna searcher, with proposals whose answer is already known answered on the driver at
    once instead of by a trial: what stage 1 rejected (its speedup, the penalty loss) and what was
    trained before (its result). Optuna learns from them all the same; only settings that need
    training start a Tune trial (a Ray worker process). TPE re-proposes known points once it has
    settled on a region: after ``patience`` known answers in a row, the most promising untried
    setting (``untried()``, enqueued into the Optuna study) is proposed instead, so the trial budget
    is spent on training, and the search ends when nothing untried is left."""

    def __init__(self, inner: ray.tune.search.Searcher, answer: Callable[[dict], dict | None],
                 untried: Callable[[], dict | None], enqueue: Callable[[dict], None],
                 on_suggest: Callable[[dict], None], patience: int = 20):
        super().__init__(metric=inner.metric, mode=inner.mode)
        self.inner, self.answer, self.untried, self.enqueue = inner, answer, untried, enqueue
        self.on_suggest, self.patience = on_suggest, patience
        self.answered = 0
        # each proposal is its own Optuna trial: an id answered here is finished, and asking the
        # inner searcher again under it would hand back the same finished trial (forever)
        self.inner_id: dict[str, str] = {}
        self.asked = 0

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.inner.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str):
        known_in_a_row = 0
        while True:
            self.asked += 1
            inner_id = f"{trial_id}~{self.asked}"
            config = self.inner.suggest(inner_id)
            if not isinstance(config, dict):
                return config
            known = self.answer(config)
            if known is None:
                self.inner_id[trial_id] = inner_id
                self.on_suggest(config)
                return config
            self.inner.on_trial_complete(inner_id, result=known)
            self.answered += 1
            known_in_a_row += 1
            if known_in_a_row >= self.patience:
                params = self.untried()
                if params is None:
                    return ray.tune.search.Searcher.FINISHED  # nothing left worth training
                self.enqueue(params)
                known_in_a_row = 0

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.inner_id:
            self.inner.on_trial_result(self.inner_id[trial_id], result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.inner_id:
            self.inner.on_trial_complete(self.inner_id.pop(trial_id), result=result, error=error)

    def save(self, checkpoint_path: str) -> None:
        self.inner.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.inner.restore(checkpoint_path)


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


class Stage2Searcher:
    """What chooses stage 2's settings, without Tune: the search space, the Optuna study (in
    ``optuna_storage``, an SQLAlchemy URL; optuna-dashboard opens it) and the searcher Tune asks
    (``searcher``). ``run_search`` drives it with Tune trials; ``benchmarks/search_efficiency.py``
    replays it against known answers.

    Its objective is one number, ``delivered_speedup`` (the recommendation is the fastest setting
    that keeps fp32's quality): a fast setting that loses quality scores low, so TPE learns to
    leave the dimensions that lose it (fp16 diverging, an eps value) instead of being drawn to
    them by their speed. It searches the real dimensions (``SearchSpace``), so what it learns about
    one carries to every setting that shares it; proposals stage 1 rejected cost nothing but still
    teach it. The two fastest untried survivors are proposed first (the likeliest recommendation),
    and TPE models from the start: proposals answered without training already fill its start-up.
    What a resumed study already trained (``previous``: {key: [speedup, drift_in_margins]}) is
    entered as finished trials before the search starts: learned from, never trained again. A
    trained setting's answer is read from ``cache`` (``<key>.json``, written by its trial)."""

    def __init__(self, study: StudyConfig, grid: list[Setting], known: dict[str, dict], survivors: list[Setting],
                 *, eps_defaults: dict[str, float], num_trials: int, cache: Path,
                 previous: dict[str, list[float]] | None = None, optuna_storage: str | None = None,
                 seed: int | None = None):
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        previous = previous or {}
        self.space = space = SearchSpace(grid, eps_defaults)
        by_key = {s.key(): s for s in grid}
        self.ordered = sorted(survivors, key=lambda s: -float(known[s.key()].get("speedup") or 0.0))
        first = [space.params(s) for s in self.ordered if s.key() not in previous][: min(2, num_trials)]
        self.proposals = num_trials * 4  # Optuna's proposals, known answers included (those cost no trial)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        name = f"{study.experiment}-stage2-{time.strftime('%Y%m%d-%H%M%S')}"
        store = optuna.storages.RDBStorage(optuna_storage) if optuna_storage else optuna.storages.InMemoryStorage()
        self.optuna_study = optuna.create_study(study_name=name, storage=store, direction="maximize",
                                                load_if_exists=True)
        distributions = space.optuna_distributions()
        for key, values in previous.items():
            if key in by_key:
                self.optuna_study.add_trial(optuna.trial.create_trial(
                    params=space.params(by_key[key]), distributions=distributions,
                    value=delivered_speedup(*values)))
        inner = OptunaSearch(
            metric=OBJECTIVE, mode="max", study_name=name, storage=store,
            sampler=optuna.samplers.TPESampler(n_startup_trials=TPE_STARTUP, seed=study.seed if seed is None else seed),
            points_to_evaluate=first or None,
        )
        self.known, self.previous, self.cache = known, previous, Path(cache)
        self.survivor_keys = {s.key() for s in survivors}
        self.proposed: set[str] = set()
        self.searcher = _AnswerKnown(inner, self.answer, untried=self.untried,
                                     enqueue=lambda params: self.optuna_study.enqueue_trial(params),
                                     on_suggest=lambda params: self.proposed.add(space.setting(params).key()))

    def answer(self, params: dict[str, Any]) -> dict[str, float] | None:
        """The objectives of ``params`` when known without training (None: it needs a trial)."""
        key = self.space.setting(params).key()
        if key not in self.survivor_keys:
            return {OBJECTIVE: 0.0}  # stage 1 rejected it: it delivers nothing
        if key in self.previous:
            return {OBJECTIVE: delivered_speedup(*self.previous[key])}
        if (self.cache / f"{key}.json").exists():
            row = json.loads((self.cache / f"{key}.json").read_text())
            return {OBJECTIVE: delivered_speedup(row["speedup"], row["drift_in_margins"])}
        return None

    def untried(self) -> dict[str, Any] | None:
        """The fastest survivor not trained, cached or proposed yet."""
        for setting in self.ordered:
            if setting.key() not in self.proposed and self.answer(self.space.params(setting)) is None:
                return self.space.params(setting)
        return None


def run_search(study: StudyConfig, grid: list[Setting], known: dict[str, dict], survivors: list[Setting],
               storage: Path, *, eps_defaults: dict[str, float],
               evaluate: Callable[[dict[str, Any]], dict[str, float]], on_result: Callable[[dict], None],
               previous: dict[str, list[float]] | None = None, num_trials: int | None = None,
               rung_bands: dict[int, Band] | None = None, on_start: Callable[[str], None] | None = None,
               optuna_storage: str | None = None, trainers: Trainers) -> None:
    """Stage 2: Optuna (``delivered_speedup``: speedup at fp32's quality; ``Stage2Searcher``)
    chooses what to train, each proposal a Tune trial that has a training server train it."""
    num_trials = study.budget.max_trials if num_trials is None else num_trials
    if num_trials <= 0 or not survivors:
        return
    previous = previous or {}
    chooser = Stage2Searcher(study, grid, known, survivors, eps_defaults=eps_defaults, num_trials=num_trials,
                             cache=Path(storage) / "trial-cache", previous=previous, optuna_storage=optuna_storage)
    space = chooser.space
    trainable = ray.tune.with_parameters(quality_trial, study=study, space=space, profiled=known,
                                         survivors=chooser.survivor_keys, storage=str(storage),
                                         evaluate=evaluate, rung_bands=rung_bands, trainers=trainers)
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(trainable, {"CPU": TRIAL_CPUS}),
        param_space=space.tune_space(),
        # a trial only waits for a server: the next trial reuses its process instead of starting
        # (and importing torch in) a new one
        tune_config=ray.tune.TuneConfig(search_alg=chooser.searcher, num_samples=chooser.proposals,
                                        max_concurrent_trials=study.resources.max_concurrent_trials,
                                        reuse_actors=True),
        run_config=ray.tune.RunConfig(name=f"search-{len(previous)}", storage_path=str(storage),
                                      callbacks=[_RowCallback(on_result, on_start, space)], stop=_EnoughTrained(num_trials),
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
def _find_batches(study: StudyConfig, settings: list[Setting]) -> list[dict[str, Any]]:
    """On a worker with the trial's resources: the largest fitting batch of each setting."""
    import torch

    from orchestrator.batch_finder import find_batch_for_setting

    device = "cuda" if study.resources.use_gpu and torch.cuda.is_available() else "cpu"
    return [find_batch_for_setting(study, setting, device=device).as_dict() for setting in settings]


def find_batches(study: StudyConfig, settings: list[Setting]) -> list[dict[str, Any]]:
    """``batch_size: auto``: one ``BatchSearch`` dict per setting (its batch size is ignored)."""
    resources = study.resources
    task = _find_batches.options(num_cpus=resources.cpus_per_worker, num_gpus=resources.gpus_per_worker)
    ref = task.remote(study, settings)
    return run_interruptibly(lambda: ray.get(ref))
