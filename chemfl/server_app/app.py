"""Flower glue for the ServerApp: check the config, make sure the data exists, run the strategy
(Flower's FedAvg in synchronous rounds, or one of ChemFL's asynchronous Flower strategies) with
centralized evaluation, write outputs/<run-name>/. The baselines (`centralized`, `local`) train in
this process instead (chemfl.server_app.baselines) and leave the SuperNodes idle."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from chemfl import protocol
from chemfl.checks import SERVER, RunSpecs, check_run_config
from chemfl.config import resolve
from chemfl.data_prep import store
from chemfl.data_prep.build import build_dataset
from chemfl.emulation.campaign import CampaignSpec
from chemfl.emulation.grid import discover_facilities, emulated_run
from chemfl.errors import ChemFLError
from chemfl.llm.adapter_init import adapter_skeleton
from chemfl.llm.lora import adapter_layout, frozen_a_digest, packed_state
from chemfl.llm.session import get_session
from chemfl.protocol import Task
from chemfl.server_app.baselines import run_baseline
from chemfl.server_app.checkpoint import AsyncState, Checkpointer, checkpoint_misfit_message, read_run_config
from chemfl.server_app.evaluation import CentralEvaluator, LocalEvaluation, before_after_table
from chemfl.server_app.facility_evaluation import FacilityEvaluation
from chemfl.server_app.grid import PromptGrid
from chemfl.server_app.outputs import AFTER_CHECKPOINT, METRICS, RunOutputs
from chemfl.server_app.strategies import AsynchronousStrategy, RunHooks, make_strategy
from chemfl.server_app.strategy_spec import StrategySpec

app = ServerApp()


@dataclass
class ResumePoint:
    """A run folder to continue (`resume`): its checkpoint, loaded into the strategy's rule, and the
    config it was started with (read before this run writes its own config.json there)."""

    folder: Path
    checkpointer: Checkpointer
    state: AsyncState
    saved_config: dict | None

    @classmethod
    def load(cls, folder: Path, strategy) -> ResumePoint:
        if not isinstance(strategy, AsynchronousStrategy):
            raise ChemFLError("resume is for asynchronous strategies")
        checkpointer = Checkpointer(folder / "checkpoint", journal=folder / METRICS)
        return cls(folder, checkpointer, checkpointer.load(strategy.rule), read_run_config(folder))

    def check_fits(self, initial: ArrayRecord, config: dict) -> None:
        """The checkpoint's adapter has this run's tensors; else say which settings differ."""
        saved = {name: tuple(value.shape) for name, value in self.state.params.items()}
        expected = {name: tuple(array.shape) for name, array in initial.items()}
        if saved != expected:
            raise ChemFLError(
                checkpoint_misfit_message(self.checkpointer.folder, config, saved, expected, self.saved_config)
            )


def check_connected_nodes(grid: Grid, wait_seconds: float = 10.0, timeout: float = 120.0) -> None:
    """Ask the SuperNodes connected at the start which facility they serve: one that cannot say
    cannot train either, and would otherwise leave the run waiting forever (e.g. plain `flwr run`
    simulating fewer SuperNodes than the recipe has facilities). Deployment runs usually start
    before any batch job does; with no node connected within `wait_seconds` nothing is asked."""
    deadline = time.monotonic() + wait_seconds
    nodes = list(grid.get_node_ids())
    while not nodes and time.monotonic() < deadline:
        time.sleep(0.5)
        nodes = list(grid.get_node_ids())
    if not nodes:
        return
    queries = [Message(RecordDict(), dst_node_id=node, message_type=protocol.QUERY) for node in nodes]
    for reply in PromptGrid(grid).send_and_receive(queries, timeout=timeout):
        if reply.has_error():
            raise ChemFLError(
                f"SuperNode {reply.metadata.src_node_id} cannot serve this run: {reply.error.reason.strip()}. "
                "In simulation run `chemfl simulate RECIPE` (one SuperNode per facility), or set "
                "options.num-supernodes to the number of data.facilities under [superlink.local] in "
                "$FLWR_HOME/config.toml (default ~/.flwr/config.toml) and run flwr run again; in "
                "deployment fix that facility's node config (data-path)"
            )


def campaign_hooks(
    grid: Grid, campaign: CampaignSpec, spec: StrategySpec, outputs: RunOutputs, alarm: Callable[[], float | None]
) -> tuple:
    """(EmulatedGrid, RunHooks) for a virtual-time campaign on the SuperNodes, one per facility
    (each asked which facility it serves)."""
    grid = PromptGrid(grid)
    real = discover_facilities(grid, len(campaign.facilities))
    real_node_of = {facility: node for node, facility in real.items()}
    return emulated_run(grid, campaign, real_node_of, spec, outputs.append_metrics, alarm, objective="model")


def prepare_run(config: dict, specs: RunSpecs, resume: str) -> tuple[Path, list[str], list[dict], RunOutputs]:
    """The data build (built, or verified and reused), its facilities and test records, and the run
    folder with the resolved config.json in it."""
    data_path = Path(str(config["data.path"]))
    built = build_dataset(specs.build, data_path)
    log(INFO, "data: %s build %s (%s)", data_path, built.manifest["build_id"], "reused" if built.reused else "built")
    test_records = store.read_records(data_path / "test.parquet")
    outputs = RunOutputs(
        Path(str(config["outputs.dir"])), str(config["run-name"]), resume=Path(resume) if resume else None
    )
    outputs.write_json("config.json", config)
    return data_path, list(built.manifest["facilities"]), test_records, outputs


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = resolve(context.run_config)
    specs = check_run_config(config)  # every knob, before any work starts
    spec, campaign, evaluation_site = specs.strategy, specs.campaign, specs.evaluation_site
    if spec.baseline:  # no federation: nothing is sent to the SuperNodes
        data_path, facilities, test_records, outputs = prepare_run(config, specs, resume="")
        run_baseline(config, specs, data_path, facilities, test_records, outputs)
        return
    rounds: dict[int, dict] = {}
    strategy = make_strategy(spec, lambda server_round, info: rounds.__setitem__(server_round, info))
    resume = str(config["resume"])
    # A damaged checkpoint is an error now, before the data build and the model load.
    resumed = ResumePoint.load(Path(resume), strategy) if resume else None
    _, _, test_records, outputs = prepare_run(config, specs, resume)
    lora_spec = specs.lora
    facility_evaluation = None
    if evaluation_site == SERVER:
        session = get_session(config)
        adapter_model = session.model
        run_evaluation = LocalEvaluation(session, test_records, specs.eval, config)
    else:  # nothing here needs the base weights: a weightless skeleton holds the adapter
        adapter_model = adapter_skeleton(specs.model, lora_spec)
        log(INFO, "eval.at = %s: base model not loaded (the adapter is built from its config)", evaluation_site)
    initial = ArrayRecord({name: Array(value) for name, value in packed_state(adapter_model, lora_spec).items()})
    if resumed is not None:
        resumed.check_fits(initial, config)
    digest = frozen_a_digest(adapter_model) if lora_spec.freeze_a else None
    layout = adapter_layout(adapter_model, lora_spec).digest
    train_config = ConfigRecord(Task(lora_a_digest=digest, adapter_layout=layout).to_config())  # + round, task
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
    if campaign is None:
        check_connected_nodes(grid)
    started = time.perf_counter()
    if isinstance(strategy, AsynchronousStrategy):
        run_asynchronous(
            grid, strategy, spec, campaign, initial, train_config, evaluator, outputs, resumed, facility_evaluation
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
    resumed: ResumePoint | None,
    facility_evaluation: FacilityEvaluation | None,
) -> None:
    """The asynchronous strategy's `start`, with checkpoints and resume in real time, or on the
    emulated grid of a virtual-time campaign."""
    emulated = None
    if campaign is not None:
        emulated, hooks = campaign_hooks(grid, campaign, spec, outputs, alarm=strategy.rule.next_due)
        grid = emulated
    else:
        checkpointer = (
            resumed.checkpointer if resumed else Checkpointer(outputs.dir / "checkpoint", journal=outputs.metrics_path)
        )
        hooks = RunHooks(
            record=outputs.append_metrics, checkpointer=checkpointer, deferred_evaluation=facility_evaluation
        )
        if resumed is not None:
            hooks.resume_state = resumed.state
            log(INFO, "resuming %s at version %d", resumed.folder, resumed.state.version)
            # Lines the checkpoint does not count (written after it, before the crash) would count twice.
            moved = outputs.rewind_metrics(resumed.state.journal_bytes)
            if moved:
                log(
                    WARNING,
                    "%d metrics.jsonl line(s) written after the checkpoint moved to %s",
                    moved,
                    outputs.dir / AFTER_CHECKPOINT,
                )
    record = hooks.record
    hooks.record = lambda line: record(evaluator.with_result(line))
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
