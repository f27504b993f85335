#!/usr/bin/env bash
# README command 2: install, then run the whole test suite. A run that executes no test fails.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh || exit 1
.venv/bin/python -m pytest tests "$@"
status=$?
if [ "$status" -eq 5 ]; then
    echo "scripts/test.sh: FAILED: pytest collected no tests (exit 5); a run without tests is a failure" >&2
    exit 1
fi
exit "$status"
