"""ChemFL's asynchronous strategies as a Flower user meets them: `FedBuff(buffer_size=2)` in a
minimal ServerApp that is not ChemFL's (numpy arrays, its own ClientApp), run by `flwr run` on the
simulation engine, returning Flower's `Result`."""

from __future__ import annotations

import json
import textwrap

import pytest

from chemfl.simulation import simulate

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "plainapp"
version = "1.0.0"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["plainapp"]

[tool.flwr.app]
publisher = "someone-else"

[tool.flwr.app.components]
serverapp = "plainapp.server:app"
clientapp = "plainapp.client:app"

[tool.flwr.app.config]
out = ""
"""

SERVER = """\
import json

import numpy as np
from flwr.app import Array, ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from chemfl.server_app.strategies import FedBuff

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    strategy = FedBuff(buffer_size=2, staleness="constant")
    initial = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=4, timeout=120)
    summary = {
        "w": result.arrays["w"].numpy().tolist(),
        "train": {str(k): dict(v) for k, v in result.train_metrics_clientapp.items()},
    }
    with open(context.run_config["out"], "w") as handle:
        json.dump(summary, handle)
"""

CLIENT = """\
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    w = msg.content["arrays"]["w"].numpy()
    trained = ArrayRecord({"w": Array(w + 1.0)})  # every update moves w by exactly +1
    metrics = MetricRecord({"num-examples": 10, "train-loss": 0.5})
    return Message(RecordDict({"arrays": trained, "metrics": metrics}), reply_to=msg)
"""


def test_fedbuff_runs_in_a_plain_flower_serverapp(tmp_path):
    app_dir = tmp_path / "plainapp"
    (app_dir / "plainapp").mkdir(parents=True)
    (app_dir / "pyproject.toml").write_text(PYPROJECT)
    (app_dir / "plainapp" / "__init__.py").write_text("")
    (app_dir / "plainapp" / "server.py").write_text(SERVER)
    (app_dir / "plainapp" / "client.py").write_text(CLIENT)
    out = tmp_path / "result.json"
    recipe = tmp_path / "run.toml"
    recipe.write_text(f"out = {json.dumps(str(out))}\n")
    finished = simulate(recipe, app_dir, tmp_path, num_supernodes=3, cpus_per_client=1, capture=True, timeout=240)
    assert finished.returncode == 0, textwrap.shorten(finished.stdout + finished.stderr, 3000)
    result = json.loads(out.read_text())
    # Each of the 4 versions averages K = 2 deltas of exactly -1 (constant staleness, server lr 1).
    assert result["w"] == [4.0, 4.0, 4.0]
    assert sorted(result["train"]) == ["1", "2", "3", "4"]
    assert all(metrics["train-loss"] == pytest.approx(0.5) for metrics in result["train"].values())
