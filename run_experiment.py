#!/usr/bin/env python
"""Run an AMP study: find the mixed-precision settings that train a GAN fastest without hurting
its image quality.

    python run_experiment.py                      # pix2pixHD, tiny preset, local Ray, sqlite MLflow
    python run_experiment.py --model spade --output runs/spade
    ray submit cluster.yaml run_experiment.py -- --model vid2vid   # on a running cluster

Works standalone (``ray submit`` copies only this file): the project itself must be installed.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

DEFAULT_MODEL = "pix2pixhd"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    return parser.parse_args(argv)


def resume_command(argv: list[str], output: Path) -> str:
    """The command line that continues this study: the same arguments, its output, ``--resume``."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--output":
            skip = True
        elif arg != "--resume" and not arg.startswith("--output="):
            kept.append(arg)
    return shlex.join(["python", "run_experiment.py", *kept, "--output", str(output), "--resume"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
    try:
        config = load_config(path, overrides)
        if config.search.auto_eps:
            from orchestrator.doctor import expand_auto_eps  # the doctor picks the eps values (no Ray)

            config = expand_auto_eps(config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from orchestrator import capacity, search
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
    print(f"study {config.experiment!r}: model {config.model.name} ({config.model.preset}), output {output}")
    where = search.connect(args.address)
    try:
        # before anything is written; on a head `ray up` launched, the autoscaler's node types count too
        capacity.check_resources(config.resources,
                                 os.environ.get("AMP_AUTOSCALER_CONFIG", capacity.DEFAULT_AUTOSCALER_CONFIG))
        print(f"Ray: {where}")
        result = Study(config, output, tracking_uri, resume=args.resume).run()
    except capacity.ResourceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: everything finished so far is in {output / 'results.parquet'}; continue with\n"
              f"  {resume_command(sys.argv[1:] if argv is None else argv, output)}", file=sys.stderr)
        return 130
    finally:
        import ray

        ray.shutdown()

    print()
    print(result["table"])
    print()
    print(f"recommended for {result['model']}: {result['recommended']['label']} — {result['recommended']['verdict']}")
    print(f"  speedup {result['recommended']['speedup']:.2f}x "
          f"[{result['recommended']['speedup_interval'][0]:.2f}, {result['recommended']['speedup_interval'][1]:.2f}]")
    for name, p in result["paths"].items():
        print(f"  {name}: {p}")
    print(f"\nBrowse the runs:\n  {browse_hint(tracking_uri)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
