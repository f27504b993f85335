"""Flower glue for the ServerApp: check the config, make sure the data exists, run the strategy
(Flower's FedAvg in synchronous rounds, or one of ChemFL's asynchronous Flower strategies) with
centralized evaluation, write outputs/<run-name>/."""

from __future__ import annotations

import time
from functools import partial
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from chemfl import protocol
from chemfl.config import resolve, split_list
from chemfl.data_prep import store
from chemfl.data_prep.build import BuildSpec, build_dataset
from chemfl.emulation import parse_slowdown
from chemfl.emulation.campaign import CampaignSpec
from chemfl.emulation.grid import EmulatedGrid, discover_facilities
from chemfl.errors import ChemFLError
from chemfl.llm.adapter_init import adapter_skeleton
from chemfl.llm.evaluation import EvalSpec
from chemfl.llm.lora import exchanged_state, frozen_a_digest
from chemfl.llm.model import LoraSpec, ModelSpec
from chemfl.llm.session import get_session
from chemfl.llm.training import TrainSpec
from chemfl.protocol import RunLine, Task
from chemfl.server_app.checkpoint import Checkpointer
from chemfl.server_app.evaluation import CentralEvaluator, LocalEvaluation, before_after_table
from chemfl.server_app.facility_evaluation import FacilityEvaluation
from chemfl.server_app.grid import PromptGrid
from chemfl.server_app.outputs import RunOutputs
from chemfl.server_app.strategies import AsynchronousStrategy, RunHooks, make_strategy
from chemfl.server_app.strategy_spec import StrategySpec

app = ServerApp()


SERVER = "server"


def check_evaluation_site(config: dict, spec: StrategySpec) -> str:
    """`eval.at`: "server", or a facility of `data.facilities` (not under virtual time, whose
    emulated grid times training tasks only)."""
    site = str(config["eval.at"])
    facilities = split_list(str(config["data.facilities"]))
    if site != SERVER and site not in facilities:
        raise ChemFLError(f'eval.at = {site!r}; use "server" or one of data.facilities ({", ".join(facilities)})')
    if site != SERVER and spec.virtual_time:
        raise ChemFLError('eval.at = <facility> is for real-time runs; emulated campaigns use eval.at = "server"')
    return site


def campaign_hooks(grid: Grid, campaign: CampaignSpec, spec: StrategySpec, outputs: RunOutputs) -> tuple:
    """(EmulatedGrid, RunHooks) for a virtual-time campaign: virtual clock, batch jobs, queue waits
    (no checkpoints: the campaign is rerun from its seed instead)."""
    facilities = [f.name for f in campaign.facilities]
    grid = PromptGrid(grid)
    real = discover_facilities(grid, len(facilities))
    run_line = RunLine(
        strategy=spec.name,
        campaign=campaign.name,
        seed=campaign.seed,
        virtual_time=True,
        facilities={name: {"nodes": 1, "supernodes": 1} for name in facilities},
    )
    outputs.append_metrics(protocol.to_json(run_line))
    emulated = EmulatedGrid(
        grid, campaign, {facility: node for node, facility in real.items()}, spec.local_steps, outputs.append_metrics
    )
    hooks = RunHooks(
        record=outputs.append_metrics,
        clock=emulated.clock,
        sleep=emulated.sleep,
        facility_of={emulated.node_id(name): name for name in facilities},
    )
    return emulated, hooks


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = resolve(context.run_config)
    # Every knob is checked before any work starts.
    build_spec = BuildSpec.from_config(config)
    for spec_type in (ModelSpec, LoraSpec, TrainSpec):
        spec_type.from_config(config)
    eval_spec = EvalSpec.from_config(config)
    parse_slowdown(str(config["emulation.slowdown"]))
    spec = StrategySpec.from_config(config)
    campaign = (
        CampaignSpec.from_config(config, tuple(split_list(str(config["data.facilities"]))))
        if spec.virtual_time
        else None
    )
    evaluation_site = check_evaluation_site(config, spec)
    rounds: dict[int, dict] = {}
    strategy = make_strategy(spec, lambda server_round, info: rounds.__setitem__(server_round, info))
    resume = str(config["resume"])
    if resume and (not spec.asynchronous or spec.virtual_time):
        raise ChemFLError(
            "resume is for asynchronous runs in real time (strategy.name = fedbuff, fedasync or "
            "walltime-aware, emulation.virtual-time = false); rerun an emulated campaign instead"
        )

    data_path = Path(str(config["data.path"]))
    built = build_dataset(build_spec, data_path)
    log(INFO, "data: %s build %s (%s)", data_path, built.manifest["build_id"], "reused" if built.reused else "built")
    test_records = store.read_records(data_path / "test.parquet")

    outputs = RunOutputs(
        Path(str(config["outputs.dir"])), str(config["run-name"]), resume=Path(resume) if resume else None
    )
    outputs.write_json("config.json", config)
    lora_spec = LoraSpec.from_config(config)
    facility_evaluation = None
    if evaluation_site == SERVER:
        session = get_session(config)
        adapter_model = session.model
        run_evaluation = LocalEvaluation(session, test_records, eval_spec, config)
    else:  # nothing here needs the base weights: a weightless skeleton holds the adapter
        adapter_model = adapter_skeleton(ModelSpec.from_config(config), lora_spec)
        log(INFO, "eval.at = %s: base model not loaded (the adapter is built from its config)", evaluation_site)
    initial = ArrayRecord(exchanged_state(adapter_model, lora_spec))
    digest = frozen_a_digest(adapter_model) if lora_spec.freeze_a else None
    train_config = ConfigRecord(Task(lora_a_digest=digest).to_config())  # strategies add round and task
    if evaluation_site != SERVER:
        facility_evaluation = FacilityEvaluation(
            PromptGrid(grid), evaluation_site, dict(train_config), spec.message_ttl, on_result=None
        )
        run_evaluation = facility_evaluation.evaluate_state
    evaluator = CentralEvaluator(adapter_model, lora_spec, run_evaluation, config, outputs, spec.num_rounds, rounds)
    if facility_evaluation is not None:
        facility_evaluation.on_result = partial(evaluator.facility_result, evaluation_site)
    log(
        INFO,
        "ChemFL: %s, %d test records, adapter %.2f MB",
        spec.name,
        len(test_records),
        initial.count_bytes() / 1e6,
    )
    started = time.perf_counter()
    if isinstance(strategy, AsynchronousStrategy):
        run_asynchronous(
            grid, strategy, spec, campaign, initial, train_config, evaluator, outputs, resume, facility_evaluation
        )
    else:
        strategy.start(
            grid=PromptGrid(grid),
            initial_arrays=initial,
            num_rounds=spec.num_rounds,
            timeout=spec.round_timeout,
            train_config=train_config,
            evaluate_fn=evaluator,
        )
    log(INFO, "ChemFL: finished in %.1f s; outputs in %s", time.perf_counter() - started, outputs.dir)
    for line in before_after_table(evaluator.history).splitlines():
        log(INFO, "%s", line)


def run_asynchronous(
    grid: Grid,
    strategy: AsynchronousStrategy,
    spec: StrategySpec,
    campaign: CampaignSpec | None,
    initial: ArrayRecord,
    train_config: ConfigRecord,
    evaluator: CentralEvaluator,
    outputs: RunOutputs,
    resume: str,
    facility_evaluation: FacilityEvaluation | None,
) -> None:
    """The asynchronous strategy's `start`, with checkpoints and resume in real time, or on the
    emulated grid of a virtual-time campaign."""
    emulated = None
    if campaign is not None:
        emulated, hooks = campaign_hooks(grid, campaign, spec, outputs)
        grid = emulated
    else:
        checkpointer = Checkpointer(outputs.dir / "checkpoint")
        hooks = RunHooks(
            record=outputs.append_metrics, checkpointer=checkpointer, deferred_evaluation=facility_evaluation
        )
        if resume:
            hooks.resume_state = checkpointer.load(strategy.rule)
            expected = {name: tuple(array.shape) for name, array in initial.items()}
            if {k: v.shape for k, v in hooks.resume_state.params.items()} != expected:
                raise ChemFLError(f"the checkpoint in {resume} does not fit this model and LoRA configuration")
            log(INFO, "resuming %s at version %d", resume, hooks.resume_state.version)
    strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=spec.num_versions,
        timeout=spec.message_ttl,
        train_config=train_config,
        evaluate_fn=evaluator.evaluate_version,
        hooks=hooks,
    )
    if emulated is not None:
        emulated.finish()
