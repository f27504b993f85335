#!/usr/bin/env bash
# README command 1: install, then run the laptop recipe offline on the embedded defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/chemfl data build --run-config recipes/laptop.toml
.venv/bin/chemfl data baselines data/offline
