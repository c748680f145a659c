#!/usr/bin/env python
"""Run an AMP study: find the mixed-precision settings that train a GAN fastest without hurting
its image quality.

    python run_experiment.py                      # pix2pixHD, tiny preset, local Ray, sqlite MLflow
    python run_experiment.py --model spade --output runs/spade
    python run_experiment.py --dry-run            # what it would do, and an estimated cost
    ray submit cluster.yaml run_experiment.py -- --model vid2vid   # on a running cluster

The same as the installed ``amp-study run``. Works standalone (``ray submit`` copies only this file):
the project itself must be installed.
"""
import sys

from orchestrator.run import leave_if_interrupted, main

if __name__ == "__main__":
    sys.exit(leave_if_interrupted(main()))
