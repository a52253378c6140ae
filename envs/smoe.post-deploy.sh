#!/usr/bin/env bash
# Snakemake runs this once, inside the new conda environment, from the working directory.
set -euo pipefail
python -m pip install --no-deps --no-build-isolation -e .
