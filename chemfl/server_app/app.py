"""Flower glue for the ServerApp: check the config, make sure the data exists, run the strategy
(synchronous FedAvg rounds, or the asynchronous loop) with centralized evaluation, write
outputs/<run-name>/."""

from __future__ import annotations

import time
from logging import INFO
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from chemfl.config import resolve, split_list
from chemfl.data_prep import io
from chemfl.data_prep.build import BuildSpec, build_dataset
from chemfl.emulation import parse_slowdown
from chemfl.emulation.campaign import CampaignSpec
from chemfl.emulation.grid import EmulatedGrid, discover_facilities
from chemfl.errors import ChemFLError
from chemfl.llm.evaluation import EvalSpec
from chemfl.llm.lora import exchanged_state, frozen_a_digest
from chemfl.llm.model import LoraSpec, ModelSpec
from chemfl.llm.session import get_session
from chemfl.llm.training import TrainSpec
from chemfl.server_app.async_loop import AsyncRun, AsyncSpec, StopRule, check_async_spec
from chemfl.server_app.checkpoint import AsyncState, Checkpointer
from chemfl.server_app.evaluation import CentralEvaluator, before_after_table
from chemfl.server_app.grid import PromptGrid
from chemfl.server_app.outputs import RunOutputs
from chemfl.server_app.strategies import ASYNCHRONOUS, make_async_strategy, make_strategy

app = ServerApp()


def async_settings(config: dict) -> tuple[AsyncSpec, StopRule]:
    spec = AsyncSpec(
        concurrency=int(config["strategy.concurrency"]),
        message_ttl=float(config["strategy.message-ttl"]),
        max_update_norm=float(config["strategy.max-update-norm"]),
        eval_every=int(config["eval.every"]),
    )
    stop = StopRule(
        int(config["strategy.num-versions"]),
        float(config["strategy.max-seconds"]),
        float(config["strategy.target-loss"]),
    )
    check_async_spec(spec, stop)
    return spec, stop


def run_campaign(
    grid: Grid,
    campaign: CampaignSpec,
    config: dict,
    strategy,
    state: AsyncState,
    spec: AsyncSpec,
    stop: StopRule,
    evaluate,
    outputs: RunOutputs,
    train_config: dict,
) -> None:
    """The loop on an EmulatedGrid: virtual clock, batch jobs, queue waits (no checkpoints: the
    campaign is rerun from its seed instead)."""
    facilities = [f.name for f in campaign.facilities]
    grid = PromptGrid(grid)
    real = discover_facilities(grid, len(facilities))
    outputs.append_metrics(
        {
            "event": "run",
            "strategy": str(config["strategy.name"]),
            "campaign": campaign.name,
            "seed": campaign.seed,
            "virtual_time": True,
            "facilities": {name: {"nodes": 1, "supernodes": 1} for name in facilities},
        }
    )
    emulated = EmulatedGrid(
        grid,
        campaign,
        {facility: node for node, facility in real.items()},
        int(config["train.local-steps"]),
        outputs.append_metrics,
    )
    run = AsyncRun(
        emulated,
        strategy,
        state,
        spec,
        stop,
        evaluate,
        outputs.append_metrics,
        None,
        train_config,
        clock=emulated.clock,
        sleep=emulated.sleep,
        facility_of={emulated.node_id(name): name for name in facilities},
    )
    run.run()
    emulated.finish()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = resolve(context.run_config)
    # Every knob is checked before any work starts.
    build_spec = BuildSpec.from_config(config)
    for spec_type in (ModelSpec, LoraSpec, TrainSpec):
        spec_type.from_config(config)
    eval_spec = EvalSpec.from_config(config)
    parse_slowdown(str(config["emulation.slowdown"]))
    virtual_time = bool(config["emulation.virtual-time"])
    campaign = (
        CampaignSpec.from_config(config, tuple(split_list(str(config["data.facilities"])))) if virtual_time else None
    )
    # Under virtual time every strategy, FedAvg included, runs in the push/pull loop.
    asynchronous = config["strategy.name"] in ASYNCHRONOUS or virtual_time
    rounds: dict[int, dict] = {}
    if asynchronous:
        strategy = make_async_strategy(config)
        async_spec, stop = async_settings(config)
    else:
        strategy = make_strategy(config, lambda server_round, info: rounds.__setitem__(server_round, info))
    resume = str(config["resume"])
    if resume and (not asynchronous or virtual_time):
        raise ChemFLError(
            "resume is for asynchronous runs in real time (strategy.name = fedbuff, fedasync or "
            "walltime-aware, emulation.virtual-time = false); rerun an emulated campaign instead"
        )

    data_path = Path(str(config["data.path"]))
    built = build_dataset(build_spec, data_path)
    log(INFO, "data: %s build %s (%s)", data_path, built.manifest["build_id"], "reused" if built.reused else "built")
    test_records = io.read_records(data_path / "test.parquet")

    outputs = RunOutputs(
        Path(str(config["outputs.dir"])), str(config["run-name"]), resume=Path(resume) if resume else None
    )
    outputs.write_json("config.json", config)
    session = get_session(config)
    initial = exchanged_state(session.model, session.lora_spec)
    train_config = {"lora-a-digest": frozen_a_digest(session.model)} if session.lora_spec.freeze_a else {}
    evaluator = CentralEvaluator(
        session, test_records, eval_spec, config, outputs, int(config["strategy.num-rounds"]), rounds
    )
    log(
        INFO,
        "ChemFL: %s, %d test records, adapter %.2f MB",
        config["strategy.name"],
        len(test_records),
        ArrayRecord(initial).count_bytes() / 1e6,
    )
    started = time.perf_counter()
    if asynchronous:
        checkpointer = Checkpointer(outputs.dir / "checkpoint")
        if resume:
            state = checkpointer.load(strategy)
            if {k: v.shape for k, v in state.params.items()} != {k: tuple(v.shape) for k, v in initial.items()}:
                raise ChemFLError(f"the checkpoint in {resume} does not fit this model and LoRA configuration")
            log(INFO, "resuming %s at version %d", resume, state.version)
        else:
            state = AsyncState(params={k: v.numpy() for k, v in initial.items()})

        def evaluate(version: int, params: dict) -> float:
            return evaluator.evaluate_state(
                "version", version, {k: torch.from_numpy(np.asarray(v)) for k, v in params.items()}
            )["loss"]

        if campaign is None:
            AsyncRun(
                grid, strategy, state, async_spec, stop, evaluate, outputs.append_metrics, checkpointer, train_config
            ).run()
        else:
            run_campaign(grid, campaign, config, strategy, state, async_spec, stop, evaluate, outputs, train_config)
    else:
        strategy.start(
            grid=PromptGrid(grid),
            initial_arrays=ArrayRecord(initial),
            num_rounds=int(config["strategy.num-rounds"]),
            timeout=float(config["strategy.round-timeout"]),
            train_config=ConfigRecord(train_config),
            evaluate_fn=evaluator,
        )
    log(INFO, "ChemFL: finished in %.1f s; outputs in %s", time.perf_counter() - started, outputs.dir)
    for line in before_after_table(evaluator.history).splitlines():
        log(INFO, "%s", line)
