"""Flower glue for the ServerApp: check the config, make sure the data exists, run the strategy
with centralized evaluation, write outputs/<run-name>/."""

from __future__ import annotations

import time
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from chemfl.config import resolve
from chemfl.data_prep import io
from chemfl.data_prep.build import BuildSpec, build_dataset
from chemfl.llm.evaluation import EvalSpec
from chemfl.llm.lora import exchanged_state, frozen_a_digest
from chemfl.llm.model import LoraSpec, ModelSpec
from chemfl.llm.session import get_session
from chemfl.llm.training import TrainSpec
from chemfl.server_app.grid import PromptGrid
from chemfl.server_app.evaluation import CentralEvaluator, before_after_table
from chemfl.server_app.outputs import RunOutputs
from chemfl.server_app.strategies import make_strategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = resolve(context.run_config)
    # Every knob is checked before any work starts.
    build_spec = BuildSpec.from_config(config)
    for spec_type in (ModelSpec, LoraSpec, TrainSpec):
        spec_type.from_config(config)
    eval_spec = EvalSpec.from_config(config)
    rounds: dict[int, dict] = {}
    strategy = make_strategy(config, lambda server_round, info: rounds.__setitem__(server_round, info))

    data_path = Path(str(config["data.path"]))
    built = build_dataset(build_spec, data_path)
    log(INFO, "data: %s build %s (%s)", data_path, built.manifest["build_id"], "reused" if built.reused else "built")
    test_records = io.read_records(data_path / "test.parquet")

    outputs = RunOutputs(Path(str(config["outputs.dir"])), str(config["run-name"]))
    outputs.write_json("config.json", config)
    session = get_session(config)
    initial = ArrayRecord(exchanged_state(session.model, session.lora_spec))
    train_config = ConfigRecord({"lora-a-digest": frozen_a_digest(session.model)} if session.lora_spec.freeze_a else {})
    num_rounds = int(config["strategy.num-rounds"])
    evaluator = CentralEvaluator(session, test_records, eval_spec, config, outputs, num_rounds, rounds)
    log(INFO, "ChemFL: %s, %d rounds, %d test records, adapter %.2f MB", config["strategy.name"], num_rounds,
        len(test_records), initial.count_bytes() / 1e6)
    started = time.perf_counter()
    strategy.start(
        grid=PromptGrid(grid), initial_arrays=initial, num_rounds=num_rounds,
        timeout=float(config["strategy.round-timeout"]), train_config=train_config,
        evaluate_fn=evaluator,
    )
    log(INFO, "ChemFL: finished in %.1f s; outputs in %s", time.perf_counter() - started, outputs.dir)
    for line in before_after_table(evaluator.history).splitlines():
        log(INFO, "%s", line)

