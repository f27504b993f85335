"""The baselines a federated run is compared with ("does joining pay?"), in the ServerApp's process.

- `strategy.name = "centralized"`: every facility's training shard pooled, one model (`adapter/`).
- `strategy.name = "local"`: each facility alone on its own shard, one model each (`adapter-<facility>/`).

Same model, LoRA (from `lora.seed`), optimizer, batch and schedule as the federated run
(`chemfl.llm.training.train_local`), and equal compute: every model trains
`StrategySpec.matched_steps()` optimizer steps, the federated run's total, so the pooled model,
each facility's own model and the global adapter each saw as many examples (steps x batch-size x
grad-accum). One uninterrupted training per model: the learning-rate schedule and warm-up run over
all its steps, where a federated node restarts them every task.

The shards are read from the data build (`data.path/partitions/<facility>`, checked against their
shard.json); Flower's SuperNodes are not used. The run folder is the federated one's: config.json,
metrics.jsonl (a run line; per model a training line and an evaluation line with the full test-set
result; centralized also evaluates the initial adapter, as FedAvg does at round 0), adapters in PEFT
format.
"""

from __future__ import annotations

import time
from dataclasses import replace
from logging import INFO
from pathlib import Path

import torch
from flwr.common.logger import log

from chemfl import protocol
from chemfl.checks import SERVER, RunSpecs
from chemfl.data_prep.formatting import LazyExamples
from chemfl.data_prep.shards import Shard, load_shard
from chemfl.llm.adapter_init import adapter_skeleton
from chemfl.llm.evaluation import evaluate as evaluate_model
from chemfl.llm.lora import load_packed_state, packed_state
from chemfl.llm.session import get_session
from chemfl.llm.training import TrainSpec, batch_order_seed, train_local
from chemfl.protocol import EvaluationLine, RunLine, TrainingLine
from chemfl.server_app.evaluation import before_after_table
from chemfl.server_app.outputs import RunOutputs

CENTRALIZED_ADAPTER = "adapter"


def local_adapter(facility: str) -> str:
    """The run folder's adapter of a facility's local-only model."""
    return f"adapter-{facility}"


def run_baseline(
    config: dict, specs: RunSpecs, data_path: Path, facilities: list[str], test_records: list[dict], outputs: RunOutputs
) -> None:
    """Train and evaluate the baseline `specs.strategy` names; write it all to `outputs`."""
    strategy = specs.strategy
    session = get_session(config)
    # The seeded initial adapter, from the model's config: the process's model may hold an earlier run's training.
    initial = packed_state(adapter_skeleton(specs.model, specs.lora), specs.lora)
    train_spec = replace(specs.train, local_steps=strategy.matched_steps())
    max_length, system_prompt = int(config["train.max-length"]), str(config["model.system-prompt"])
    shards = [load_shard(data_path / "partitions" / facility) for facility in facilities]
    started = time.perf_counter()
    outputs.append_metrics(protocol.to_json(RunLine(strategy=strategy.name)))
    if strategy.name == "centralized":
        models = [(CENTRALIZED_ADAPTER, shards)]
    else:
        models = [(local_adapter(shard.facility), [shard]) for shard in shards]
    log(
        INFO,
        "ChemFL: %s baseline, %d model(s) of %d optimizer steps x %d examples each, %d test records",
        strategy.name,
        len(models),
        train_spec.local_steps,
        train_spec.batch_size * train_spec.grad_accum,
        len(test_records),
    )

    def evaluate(version: int, adapter: str) -> dict:
        """The model as it is now, saved (or to be saved) as `adapter`; 0 before training, 1 after."""
        requested = time.perf_counter() - started
        result = evaluate_model(session.model, session.tokenizer, test_records, specs.eval, max_length, system_prompt)
        result["seconds"] = time.perf_counter() - started - requested
        named = None if strategy.name == "centralized" else adapter  # only a run of several adapters names them
        line = EvaluationLine(
            version, requested, requested + result["seconds"], SERVER, float(result["loss"]), result, named
        )
        outputs.append_metrics(protocol.to_json(line))
        exact_match = (result["overall"] or {}).get("exact_match")
        log(
            INFO,
            "%s%s: test loss %.3f%s",
            adapter,
            " before training" if version == 0 else "",
            result["loss"],
            "" if exact_match is None else f", exact match {exact_match:.3f}",
        )
        return result

    if strategy.name == "centralized":  # the run's one adapter: evaluated before training too, as FedAvg's round 0
        load_packed_state(session.model, specs.lora, initial, None)
        history = [{"step": 0, "eval": evaluate(0, CENTRALIZED_ADAPTER)}]
    for adapter, group in models:
        load_packed_state(session.model, specs.lora, initial, None)
        train_model(session, group, train_spec, config, adapter, outputs, started)
        outputs.save_adapter(session.model, adapter)
        result = evaluate(1, adapter)
    log(INFO, "ChemFL: %s finished in %.1f s; outputs in %s", strategy.name, time.perf_counter() - started, outputs.dir)
    if strategy.name == "centralized":
        history.append({"step": train_spec.local_steps, "eval": result})
        for line in before_after_table(history).splitlines():
            log(INFO, "%s", line)


def train_model(
    session, shards: list[Shard], spec: TrainSpec, config: dict, adapter: str, outputs: RunOutputs, started: float
) -> None:
    """`spec.local_steps` steps on the shards' training records, pooled in facility order; the
    batch order is seeded as a federated task's (train.seed, task key 0, the first partition), and
    so is dropout, so one facility trained alone or "pooled" with nobody else is the same model."""
    records = [record for shard in shards for record in shard.train]
    examples = LazyExamples(session.tokenizer, records, spec.max_length, str(config["model.system-prompt"]))
    seed = batch_order_seed(spec.seed, 0, min(shard.partition_id for shard in shards))
    names = [shard.facility for shard in shards]
    log(INFO, "%s: training on %s (%d records)", adapter, ", ".join(names), len(records))
    torch.manual_seed(seed)
    result = train_local(session.model, examples, spec, session.tokenizer.pad_token_id, seed, session.accelerator)
    line = TrainingLine(
        adapter=adapter,
        facilities=names,
        records=len(records),
        steps=result.steps,
        examples=result.steps * spec.batch_size * spec.grad_accum,
        train_loss=result.loss,
        seconds=result.seconds,
        wall_time=time.perf_counter() - started,
    )
    outputs.append_metrics(protocol.to_json(line))
    log(
        INFO,
        "%s: %d steps, %d examples, train loss %.3f, %.0f s",
        adapter,
        line.steps,
        line.examples,
        line.train_loss,
        line.seconds,
    )
