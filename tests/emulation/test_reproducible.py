"""A seed's campaign is the same line for line, losses included: the real ServerApp and the real
ClientApp training in one process, twice, with the tasks trained and returned in other real
orders and torch's generator left in another state before every task (tests/emulation/actor_grid.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

from chemfl.config import resolve
from chemfl.llm.session import _SESSIONS
from chemfl.server_app.app import main
from tests.emulation.actor_grid import ActorPoolGrid
from tests.tiny import save_tiny_llama

pytestmark = pytest.mark.usefixtures("server_task_identity")

FACILITIES = ("polaris", "frontier", "perlmutter")
# Measured in real time, so they differ from run to run: the only fields left out of the comparison.
WALL_CLOCK = ("server_seconds", "evaluation_seconds")


def campaign_config(tmp: Path, model: str, outputs: str) -> dict:
    return resolve(
        {
            "run-name": "campaign",
            "data.path": str(tmp / "data"),
            "data.max-molecules": 30,
            "data.facilities": ",".join(FACILITIES),
            "model.name": model,
            "model.gguf-file": "",
            "model.cache-dir": str(tmp / "cache"),
            "lora.r": 4,
            "lora.alpha": 8,
            "lora.dropout": 0.1,  # random masks in every step: what made two runs drift apart
            "train.local-steps": 3,
            "train.batch-size": 2,
            "train.lr": 0.01,
            "train.max-length": 128,
            "strategy.name": "walltime-aware",
            "strategy.num-versions": 16,
            "strategy.max-seconds": 24 * 3600.0,
            "strategy.max-local-steps": 6,
            "eval.every": 1,
            "eval.loss-per-task": 2,
            "eval.generate-per-task": 0,
            "outputs.dir": str(tmp / outputs),
            "outputs.keep-every-adapter": False,
            "emulation.virtual-time": True,
            "emulation.campaign": "reproducible",
            "emulation.seconds-per-step": "polaris=300,frontier=400,perlmutter=300",
            "emulation.walltime": "polaris=3600,frontier=7200,perlmutter=1800",
            "emulation.queue-median": "polaris=600,frontier=1800,perlmutter=300",
            "emulation.startup-seconds": "polaris=120,frontier=150,perlmutter=120",
            "emulation.task-overhead-seconds": 30.0,
        }
    )


def run_campaign(tmp: Path, model: str, order_seed: int) -> tuple[list[dict], int]:
    config = campaign_config(tmp, model, f"outputs-{order_seed}")
    grid = ActorPoolGrid(config, FACILITIES, order_seed)
    _SESSIONS.clear()  # a fresh ServerApp process: the initial adapter is the seeded one, not the last run's
    main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    metrics = Path(str(config["outputs.dir"])) / "campaign" / "metrics.jsonl"
    return [json.loads(line) for line in metrics.read_text().splitlines()], grid.trained


def without_wall_clock(line: dict) -> dict:
    kept = {key: value for key, value in line.items() if key not in WALL_CLOCK}
    if isinstance(kept.get("eval"), dict):  # the evaluation's own duration
        kept["eval"] = {key: value for key, value in kept["eval"].items() if key != "seconds"}
    return kept


@pytest.fixture
def one_thread():
    """One torch thread, as a Ray actor of one CPU has: on 2 shared cores, 2 threads that wait on
    each other make this test 7x slower (82 s against 12 s here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_one_seed_gives_one_campaign_line_for_line_losses_included(tmp_path):
    model = save_tiny_llama(tmp_path / "tiny-llama")
    first, trained = run_campaign(tmp_path, model, order_seed=0)
    again, _ = run_campaign(tmp_path, model, order_seed=1)

    versions = [line for line in first if line["event"] == "version"]
    updates = [line for line in first if line["event"] == "update"]
    assert len(versions) == 17 and trained >= len(updates) >= 16
    assert versions[-1]["eval_loss"] < versions[0]["eval_loss"]  # it trained
    assert len(first) == len(again)
    for number, (one, other) in enumerate(zip(first, again, strict=True)):
        assert without_wall_clock(one) == without_wall_clock(other), f"metrics.jsonl line {number + 1} differs"
