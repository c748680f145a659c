"""``amp-study`` (installed) or ``python -m orchestrator``: the project's one command line.

    amp-study run [--model NAME] [--dry-run] [...]       # a study (the same as python run_experiment.py)
    amp-study report --output runs/pix2pixhd-tiny        # rebuild the report from results.parquet
    amp-study report --experiment pix2pixhd-tiny --tracking-uri URI --to DIR   # ... from MLflow alone
    amp-study sync --output runs/pix2pixhd-tiny [--tracking-uri URI]           # log rows MLflow missed
    amp-study compare runs/*/                            # the cross-model table
    amp-study doctor --model NAME|file.py:Class [--dtype fp16] [--opt-level O1]   # fp16 hazards before a search
    amp-study --version
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml


def frame_from_mlflow(uri: str, experiment: str) -> tuple[dict, pd.DataFrame, str]:
    """(study config, results table, parent run id) of the experiment's latest study, from MLflow."""
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking import PARENT_TAG

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"error: no MLflow experiment {experiment!r} at {uri}")
    parents = client.search_runs([found.experiment_id], filter_string="tags.`amp.kind` = 'study'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        raise SystemExit(f"error: experiment {experiment!r} has no study run")
    parent = parents[0]
    with tempfile.TemporaryDirectory() as tmp:
        config = json.loads(Path(client.download_artifacts(parent.info.run_id, "study.json", tmp)).read_text())
        children = client.search_runs([found.experiment_id], max_results=10000,
                                      filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")
        rows = []
        for run in children:
            local = client.download_artifacts(run.info.run_id, "row.json", tmp)
            rows.append(json.loads(Path(local).read_text()))
    return config, pd.DataFrame(rows), parent.info.run_id


def build_report(config_raw: dict, frame: pd.DataFrame, target: Path, tracking_uri: str) -> dict:
    from orchestrator.config import parse_config
    from orchestrator.recommend import recommend, write_recommendation
    from orchestrator.report import write_report
    from models.base import load_model

    config = parse_config(config_raw, "study configuration")
    model = load_model(config.model.name, **config.model.options)
    rec = recommend(frame, model=model.name, preset=config.model.preset, quality=config.quality,
                    reference=config.reference, torch_default=config.torch_default)
    rec["study"] = {"experiment": config.experiment, "resolution": f"{config.data.height}x{config.data.width}",
                    "reference_batch_size": config.reference.batch_size, "tracking_uri": tracking_uri}
    write_recommendation(rec, target)
    write_report(rec, frame, target, tracking_uri=tracking_uri, machine="(rebuilt from recorded results)")
    return rec


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("amp-study")
    except PackageNotFoundError:  # a source checkout that was never installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = "amp-study" if Path(sys.argv[0]).name == "amp-study" else "python -m orchestrator"
    if argv[:1] == ["run"]:  # every option of a study's own command line, unchanged
        from orchestrator.run import leave_if_interrupted
        from orchestrator.run import main as run_main

        return leave_if_interrupted(run_main(argv[1:], prog=f"{prog} run"))
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"amp-study {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run a study (options: `run --help`)")
    rep = sub.add_parser("report", help="rebuild report.md and the recommendation")
    rep.add_argument("--output", type=Path, help="a study's output folder (reads its results.parquet)")
    rep.add_argument("--experiment", help="MLflow experiment name (rebuild from MLflow alone)")
    rep.add_argument("--tracking-uri", help="MLflow tracking URI (with --experiment)")
    rep.add_argument("--to", type=Path, help="where to write (default: the study folder, or reports/<experiment>)")
    syn = sub.add_parser("sync", help="log to MLflow the rows it missed while unreachable")
    syn.add_argument("--output", type=Path, required=True)
    syn.add_argument("--tracking-uri")
    cmp_ = sub.add_parser("compare", help="the cross-model table of several studies' recommendations")
    cmp_.add_argument("recommendations", type=Path, nargs="+",
                      help="recommendations/<model>.yaml files, or study output folders")
    doc = sub.add_parser("doctor", help="a model's fp16/bf16 hazards and per-layer cost, from a few instrumented steps")
    doc.add_argument("--model", required=True, help="registered model name, or path/to/file.py:ClassName")
    doc.add_argument("--preset", default="tiny", help="tiny | small | paper (default: %(default)s)")
    doc.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    doc.add_argument("--opt-level", choices=["O1", "O2", "O3"], default="O1")
    doc.add_argument("--steps", type=int, default=2, help="training steps in the chosen precision after the paired "
                     "forward/backward (default: %(default)s; the last one under torch.profiler, the others under the "
                     "op tracer; 0: the paired pass only)")
    doc.add_argument("--batch-size", type=int, default=2)
    doc.add_argument("--search-space", type=Path,
                     help="take the data section and model options from this study YAML (default: the model's own)")
    doc.add_argument("--eps", action="append", default=[], metavar="SITE=VALUE", help="an eps site's value (repeatable)")
    doc.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                     help="override a preset key (YAML value; repeatable)")
    doc.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    doc.add_argument("--no-profile", action="store_true", help="skip the per-layer time breakdown")
    doc.add_argument("--no-suggest", action="store_true", help="do not re-run to find and check eps values")
    doc.add_argument("--output", type=Path, help="where doctor.md and doctor.json go "
                     "(default: runs/doctor/<model>-<preset>-<opt level>-<dtype>)")
    doc.add_argument("--tracking-uri", help="log an MLflow run there (default: $MLFLOW_TRACKING_URI; none when unset)")
    doc.add_argument("--experiment", default="doctor", help="MLflow experiment of that run (default: %(default)s)")
    args = parser.parse_args(argv)

    if args.command == "doctor":
        return doctor(args, parser)

    if args.command == "compare":
        from orchestrator.report import cross_model_table

        files = [f for p in args.recommendations
                 for f in (sorted((p / "recommendations").glob("*.yaml")) if p.is_dir() else [p])]
        missing = [str(f) for f in files if not f.is_file()] or ([] if files else [str(p) for p in args.recommendations])
        if missing:
            parser.error(f"no recommendation found at {', '.join(missing)}")
        print(cross_model_table(files))
        return 0

    if args.command == "sync":
        from orchestrator.study import Study

        study = Study.reopen(args.output.resolve(), args.tracking_uri)
        logged, pending = study.sync()
        print(f"logged {logged} rows to {study.tracking_uri}; {pending} still pending")
        return 0 if pending == 0 else 1

    if args.experiment:
        import os

        uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            parser.error("--experiment needs --tracking-uri (or MLFLOW_TRACKING_URI)")
        config, frame, _ = frame_from_mlflow(uri, args.experiment)
        target = args.to or Path("reports") / args.experiment
    elif args.output:
        from orchestrator.study import CONFIG_FILE

        folder = args.output.resolve()
        config = yaml.safe_load((folder / CONFIG_FILE).read_text())
        frame = pd.read_parquet(folder / "results.parquet")
        uri = args.tracking_uri or f"sqlite:///{folder / 'mlflow.db'}"
        target = args.to or folder
    else:
        parser.error("report needs --output DIR or --experiment NAME")
    rec = build_report(config, frame, target.resolve(), uri)
    print(f"recommended for {rec['model']}: {rec['recommended']['label']} — {rec['recommended']['verdict']}")
    print(f"written to {target.resolve()}")
    return 0


def doctor(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``python -m orchestrator doctor``: run the doctor, print its summary, write doctor.md/json."""
    import os

    from orchestrator.config import ConfigError, load_config
    from orchestrator.doctor import diagnose, log_to_mlflow

    def pairs(items: list[str], what: str) -> dict:
        out = {}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep:
                parser.error(f"--{what} expects KEY=VALUE, got {item!r}")
            out[key] = yaml.safe_load(value)
        return out

    eps = {k: float(v) for k, v in pairs(args.eps, "eps").items()}
    options = pairs(args.option, "option")
    data = None
    if args.search_space:
        try:
            config = load_config(args.search_space, {"model.name": args.model})
        except ConfigError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        data, options = config.data, {**config.model.options, **options}
    try:
        diagnosis = diagnose(args.model, preset=args.preset, dtype=args.dtype, opt_level=args.opt_level,
                             steps=args.steps, batch_size=args.batch_size, data=data, eps=eps, options=options,
                             device=args.device, profile=not args.no_profile, suggest=not args.no_suggest,
                             log=lambda message: print(f"  {message}", file=sys.stderr, flush=True))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    name = Path(args.model.split(":")[-1]).name if ".py:" in args.model else args.model
    folder = args.output or Path("runs") / "doctor" / f"{name}-{args.preset}-{args.opt_level}-{args.dtype}"
    files = diagnosis.write(folder)
    print(diagnosis.summary())
    print(f"written: {files['doctor.md'].resolve()}, {files['doctor.json'].resolve()}")
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        run_id = log_to_mlflow(diagnosis, uri, args.experiment, files)
        print(f"MLflow run {run_id} in experiment {args.experiment!r} at {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
