"""The cross-model "configuration vs speedup" table: one study per model, then their
recommendations side by side (best at the fp32 batch, best with a larger batch, recommended).

    python benchmarks/cross_model.py                                  # the five seed models, tiny presets
    python benchmarks/cross_model.py --models spade vid2vid --set budget.max_trials=2

Each study is a plain ``run_experiment.py`` run in its own process (its own local Ray), so a
failing model is reported and the others still run. Finished studies are kept: rerunning with the
same ``--output`` only runs the models that have no recommendation yet.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["pix2pixhd", "spade", "inpainting", "vid2vid", "fs_vid2vid"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "cross-model")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to every study (run_experiment.py --set)")
    args = parser.parse_args()
    args.output = args.output.resolve()
    args.output.mkdir(parents=True, exist_ok=True)

    folders, failed = [], []
    for model in args.models:
        out = args.output / model
        if list((out / "recommendations").glob("*.yaml")):
            print(f"{model}: already done in {out}")
            folders.append(out)
            continue
        command = [sys.executable, "run_experiment.py", "--model", model, "--output", str(out),
                   *(x for item in args.set for x in ("--set", item))]
        if (out / "results.parquet").exists():
            command.append("--resume")
        print(f"{model}: {' '.join(command[1:])}", flush=True)
        started = time.time()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        (args.output / f"{model}.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            print(f"{model}: FAILED after {time.time() - started:.0f} s (log: {args.output / f'{model}.log'})\n"
                  + done.stderr[-1500:], flush=True)
            failed.append(model)
            continue
        print(f"{model}: done in {time.time() - started:.0f} s", flush=True)
        folders.append(out)

    if folders:
        table = subprocess.run([sys.executable, "-m", "orchestrator", "compare", *map(str, folders)], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout
        print()
        print(table)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
