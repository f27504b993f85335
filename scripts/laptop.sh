#!/usr/bin/env bash
# README command 1: install into .venv, then run the laptop recipe offline on the embedded
# defaults: build the data, fine-tune across 4 simulated facilities, print the before/after table.
set -euo pipefail
cd "$(dirname "$0")/.."
RECIPE=${1:-recipes/laptop.toml}
bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH"
# A project-local Flower home: its own managed SuperLink, started here (so relative paths in the
# recipe resolve against this folder) and stopped when this script ends.
export FLWR_HOME="$PWD/.flwr"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1  # everything is installed in .venv already
stop_superlink() { pkill -f "$FLWR_HOME/local-superlink" 2>/dev/null || true; }
stop_superlink
trap stop_superlink EXIT
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "local"

[superlink.local]
address = ":local:"
options.num-supernodes = 4               # one per facility in the recipe
options.backend.client-resources.num-cpus = 2  # one ClientApp at a time on a 2-core laptop
options.backend.client-resources.num-gpus = 0
TOML
chemfl data build --run-config "$RECIPE"
chemfl data baselines "$(python -c "import tomllib,sys; print(tomllib.load(open(sys.argv[1],'rb'))['data']['path'])" "$RECIPE")"
flwr run . --run-config "$RECIPE" --stream
