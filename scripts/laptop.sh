#!/usr/bin/env bash
# README command 1: install into .venv, then run the laptop recipe offline on the embedded
# defaults: build the data, print the baseline floor, fine-tune across 4 simulated facilities,
# and print the before/after table.
set -euo pipefail
cd "$(dirname "$0")/.."
RECIPE=${1:-recipes/laptop.toml}
bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH"
chemfl data build --run-config "$RECIPE"
chemfl data baselines "$(python -c "import tomllib,sys; print(tomllib.load(open(sys.argv[1],'rb'))['data']['path'])" "$RECIPE")"
# = flwr run . --run-config "$RECIPE" --stream, on a private managed SuperLink (see README).
chemfl simulate "$RECIPE"
