"""``amp-study run`` / ``python run_experiment.py``: run a study end to end.

Reads and validates the study YAML (exit 2 on a bad field or file), starts or joins Ray, runs the
study (``orchestrator.study``) with the terminal showing its progress and ``<output>/study.log``
everything else, and prints the closing table and the recommendation. Ctrl-C stops it at once
(exit 130) and prints the ``--resume`` command that continues it.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

DEFAULT_MODEL = "pix2pixhd"

# --quick: a first look at a study in a few minutes. It keeps every precision setting and batch size
# of the search space but searches no eps values or speed flags, profiles in shorter blocks, trains
# the quality budget (capped at 128 samples) with 2 fp32 seeds and 2 paired seeds per candidate, and
# trains the 2 most promising candidates only. An explicit --set wins over these.
QUICK = {"search.eps": {}, "search.checkpointing": ["none"], "search.fusion": ["none"],
         "search.fused_optimizer": [False], "search.channels_last": [False], "search.affinity": [False],
         "budget.profile_steps": 3, "budget.profile_max_rounds": 6, "budget.reference_seeds": 2,
         "budget.candidate_seeds": 2, "budget.max_trials": 2, "budget.quality_at": [0.5],
         "budget.early_stop_at": [0.5]}
QUICK_MAX_SAMPLES = 128
RUN_SCRIPT = "python run_experiment.py"


def build_parser(prog: str = RUN_SCRIPT) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Run an AMP study: find the mixed-precision settings "
                                     "that train a GAN fastest without hurting its image quality.")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="registered model name, or path/to/file.py:ClassName (default: %(default)s)")
    parser.add_argument("--search-space", type=Path, default=None,
                        help="study YAML (default: search_spaces/<model>.yaml)")
    parser.add_argument("--output", type=Path, default=None, help="output folder (default: runs/<experiment>)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite in the output folder)")
    parser.add_argument("--address", default=None, help="existing Ray cluster address, e.g. 'auto' (default: start a local one)")
    parser.add_argument("--resume", action="store_true", help="continue the study in --output")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set budget.max_trials=2 (YAML value; repeatable)")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray, Tune and MLflow output on the terminal too (it always goes to <output>/study.log)")
    parser.add_argument("--quick", action="store_true",
                        help="a first look in a few minutes: no eps or speed-flag search, 2 seeds, 2 trained "
                             "settings, at most 128 training samples (output: runs/<experiment>-quick)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the grid, the settings stage 1 would profile, the trials stage 2 may train and "
                             "an estimated cost from a few timed steps here; start nothing")
    return parser


def resume_command(argv: list[str], output: Path, prog: str = RUN_SCRIPT) -> str:
    """The command line that continues this study: the same arguments, its output, ``--resume``."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--output":
            skip = True
        elif arg != "--resume" and not arg.startswith("--output="):
            kept.append(arg)
    return shlex.join([*shlex.split(prog), *kept, "--output", str(output), "--resume"])


def main(argv: list[str] | None = None, prog: str = RUN_SCRIPT) -> int:
    args = build_parser(prog).parse_args(argv)
    import yaml

    from orchestrator.config import ConfigError, load_config
    from search_spaces import default_path

    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"error: --set expects KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        overrides[key] = yaml.safe_load(value)
    model_name = args.model
    path = args.search_space or default_path(model_name)
    if args.model != DEFAULT_MODEL or args.search_space is None:
        overrides.setdefault("model.name", model_name)
    if args.quick:
        overrides = {**QUICK, **overrides}
    try:
        config = load_config(path, overrides)
        if args.quick:
            samples = min(config.budget.train_samples, QUICK_MAX_SAMPLES)
            config = load_config(path, {"budget.train_samples": samples, "experiment": f"{config.experiment}-quick",
                                        **overrides})
        if config.search.auto_eps:
            from orchestrator.doctor import expand_auto_eps  # the doctor picks the eps values (no Ray)

            config = expand_auto_eps(config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # the data, before anything starts Ray: every file opened once, all problems at once
    from orchestrator.data.check import check_study_data, describe_problems

    problems = check_study_data(config)
    if problems:
        print(describe_problems(problems, config.data), file=sys.stderr)
        return 2
    if args.dry_run:
        from orchestrator.plan import dry_run

        print(dry_run(config))
        return 0

    from orchestrator import capacity, interrupts, search
    from orchestrator.console import Console
    from orchestrator.study import Study
    from orchestrator.tracking import browse_hint, resolve_tracking_uri

    output = (args.output or Path("runs") / config.experiment).resolve()
    # on a cluster, the head's MLflow server (cluster.yaml starts it) unless one is named explicitly
    discovered = search.cluster_tracking_uri() if args.address else None
    tracking_uri = resolve_tracking_uri(args.tracking_uri, config.tracking.uri, output, discovered)
    if (output / "results.parquet").exists() and not args.resume:
        print(f"error: {output / 'results.parquet'} already exists: pass --resume to continue that study, "
              "or choose another --output", file=sys.stderr)
        return 2
    console = Console(output / "study.log", verbose=args.verbose).start()
    console.say(f"study {config.experiment!r}: model {config.model.name} ({config.model.preset}), output {output}")
    if not args.verbose:
        console.say(f"Ray, Tune and MLflow output goes to {console.log_path} (--verbose shows it here)")
    try:
        with interrupts.catch_interrupts():
            try:
                where = search.connect(args.address)
                # before anything is written; on a head `ray up` launched, the autoscaler's node types count too
                capacity.check_resources(config.resources,
                                         os.environ.get("AMP_AUTOSCALER_CONFIG", capacity.DEFAULT_AUTOSCALER_CONFIG),
                                         log=console.say)
                console.say(f"Ray: {where}" + (f" (session {search.session_dir()})" if search.session_dir() else ""))
                result = Study(config, output, tracking_uri, resume=args.resume, log=console.say).run()
            except capacity.ResourceError as error:
                console.error(f"error: {error}")
                return 2
            except KeyboardInterrupt:
                console.error(f"\ninterrupted: everything finished so far is in {output / 'results.parquet'}; "
                              f"continue with\n  {resume_command(sys.argv[1:] if argv is None else argv, output, prog)}")
                return 130
            except Exception as error:  # noqa: BLE001 - say it in one line; the traceback is in the log
                import traceback

                console.log_only(traceback.format_exc())
                console.error(f"error: {type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
                              f"\n  (the full traceback is in {console.log_path}; results so far are in "
                              f"{output / 'results.parquet'}: --resume continues)")
                return 1
            finally:
                _shutdown_ray()

        console.say()
        console.say(result["table"])
        console.say()
        rec = result["recommended"]
        console.say(f"recommended for {result['model']}: {rec['label']} — {rec['verdict']}")
        console.say(f"  speedup {rec['speedup']:.2f}x [{rec['speedup_interval'][0]:.2f}, {rec['speedup_interval'][1]:.2f}]")
        for name, p in result["paths"].items():
            console.say(f"  {name}: {p}")
        console.say(f"\nBrowse the runs:\n  {browse_hint(tracking_uri)}")
        return 0
    finally:
        console.stop()


def leave_if_interrupted(code: int) -> int:
    """At a process entry point: after an interrupt (130) end the process now. A Tune run cut
    short can leave a non-daemon thread still talking to the Ray that was just shut down; the
    interpreter would wait for it, and a minute later Ray's core worker ends the process with
    status 1 and a "Failed to connect to GCS" line. Everything worth keeping is written by then."""
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    return code


def _shutdown_ray() -> None:
    """Stop this study's Ray (a local one ends with it); a second Ctrl-C must not cut it short."""
    import signal

    import ray

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ray.shutdown()
    finally:
        signal.signal(signal.SIGINT, previous)


