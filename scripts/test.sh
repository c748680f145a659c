#!/usr/bin/env bash
# Install the project with its test dependencies, lint it (ruff, configured in pyproject.toml) and run
# the whole test suite (slow tests included).
# torch is installed first and pinned: on these machines torch==2.13.0 is a local CPU build, while a
# looser requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e '.[test]'
# the MLflow UI test drives Debian's chromium (apt, never `playwright install`); without it, it skips
command -v chromium >/dev/null || bash scripts/install_browser.sh || echo "no chromium: the MLflow UI test will skip" >&2
python -m ruff check .
python -m pytest -q --timeout=1800 "$@"
