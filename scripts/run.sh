#!/usr/bin/env bash
# Install the project and run the default study (pix2pixHD, tiny preset, local Ray, MLflow in sqlite).
# Extra arguments go to run_experiment.py, e.g. scripts/run.sh --model spade
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e .
python run_experiment.py "$@"
