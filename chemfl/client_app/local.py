"""The ClientApp's local path: the model is loaded in this process (simulation, whose Ray actors
keep it warm, and the per-GPU deployment layout) and trained here through chemfl.llm."""

from __future__ import annotations

import json
from functools import lru_cache
from logging import WARNING
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.logger import log

from chemfl.config import resolve
from chemfl.data_prep.formatting import LazyExamples
from chemfl.data_prep.shards import Shard, load_slice, load_test_set, parse_slice, shard_dir_for
from chemfl.emulation import emulate_slowdown
from chemfl.errors import ChemFLError
from chemfl.hpc.walltime import remaining_walltime
from chemfl.llm.evaluation import evaluate_at_facility
from chemfl.llm.lora import frozen_a_digest, load_packed_state, packed_state
from chemfl.llm.session import get_session
from chemfl.llm.training import TrainSpec, batch_order_seed, train_local
from chemfl.protocol import (
    ARRAYS,
    CONFIG,
    EVALUATION,
    EVALUATION_RESULT,
    METRICS,
    NODE,
    NodeConfig,
    NodeInfo,
    Task,
    TrainReport,
    task_local_steps,
)


@lru_cache(maxsize=4)
def _shard(folder: str, data_slice: str) -> Shard:
    """The shard (a SuperNode's slice of it, with node config data-slice), read once per process."""
    return load_slice(Path(folder), parse_slice(data_slice) if data_slice else None)


def node_shard(config: dict, context: Context) -> Shard:
    folder = shard_dir_for(str(config["data.path"]), dict(context.node_config))
    return _shard(str(folder), str(context.node_config.get(NodeConfig.DATA_SLICE, "")))


def node_record(shard: Shard, context: Context) -> ConfigRecord:
    """Who replied: facility name and, inside a batch job, the seconds of walltime left."""
    return ConfigRecord(NodeInfo(shard.facility, remaining_walltime(dict(context.node_config))).to_record())


_EXAMPLES: dict[tuple, LazyExamples] = {}


def _training_examples(session, shard: Shard, max_length: int, system_prompt: str) -> LazyExamples:
    """Tokenized on first use and kept for the process's later rounds (simulation actors persist)."""
    key = (shard.build_id, shard.facility, len(shard.train), max_length, system_prompt, id(session.tokenizer))
    if key not in _EXAMPLES:
        _EXAMPLES.clear()
        _EXAMPLES[key] = LazyExamples(session.tokenizer, shard.train, max_length, system_prompt)
    return _EXAMPLES[key]


def _receive_adapter(session, msg: Message) -> Task:
    """Loads the adapter the server sent into the node's model; returns the task that came with it."""
    task = Task.from_config(msg.content[CONFIG])
    if session.lora_spec.freeze_a and task.lora_a_digest != frozen_a_digest(session.model):
        raise ChemFLError(
            "this node's frozen LoRA A differs from the server's; both must use the same "
            "model.name, lora.* settings and lora.seed"
        )
    received = {name: array.numpy() for name, array in msg.content[ARRAYS].items()}
    load_packed_state(session.model, session.lora_spec, received, task.adapter_layout)
    return task


def train(msg: Message, context: Context) -> Message:
    config = resolve(context.run_config)
    spec = TrainSpec.from_config(config)
    session = get_session(config)
    shard = node_shard(config, context)
    task = _receive_adapter(session, msg)
    spec = spec.for_task(task_local_steps(task.local_steps, spec.local_steps), task.lr_scale)
    examples = _training_examples(session, shard, spec.max_length, str(config["model.system-prompt"]))
    seed = batch_order_seed(spec.seed, task.batch_order_key, shard.partition_id)
    cut_before = (examples.report.truncated, examples.report.dropped)
    result = train_local(session.model, examples, spec, session.tokenizer.pad_token_id, seed, session.accelerator)
    emulate_slowdown(str(config["emulation.slowdown"]), shard.facility, result.seconds)
    if (examples.report.truncated, examples.report.dropped) != cut_before:  # stays on the node: its own log
        log(
            WARNING,
            "%s: %d examples truncated, %d dropped at train.max-length = %d so far",
            shard.facility,
            examples.report.truncated,
            examples.report.dropped,
            spec.max_length,
        )
    report = TrainReport(len(examples), result.loss, result.steps, result.seconds, result.tokens_per_second)
    reply = RecordDict(
        {
            ARRAYS: ArrayRecord(
                {name: Array(value) for name, value in packed_state(session.model, session.lora_spec).items()}
            ),
            METRICS: MetricRecord(report.to_metrics()),
            NODE: node_record(shard, context),
        }
    )
    return Message(content=reply, reply_to=msg)


def evaluate_node(msg: Message, context: Context) -> Message:
    """Loss on the node's validation shard; or, asked for the test set (`eval.at` names this
    facility), the central evaluation exactly as the server would run it."""
    config = resolve(context.run_config)
    session = get_session(config)
    task = _receive_adapter(session, msg)
    on_test_set = task.evaluate_on == Task.TEST_SET
    if on_test_set:
        records = load_test_set(shard_dir_for(str(config["data.path"]), dict(context.node_config)))
    else:
        records = node_shard(config, context).validation
    result, report = evaluate_at_facility(session, config, records, on_test_set)
    content = {METRICS: MetricRecord(report.to_metrics())}
    if on_test_set:
        content[EVALUATION] = ConfigRecord({EVALUATION_RESULT: json.dumps(result)})
    return Message(content=RecordDict(content), reply_to=msg)


def describe_node(msg: Message, context: Context) -> Message:
    config = resolve(context.run_config)
    return Message(content=RecordDict({NODE: node_record(node_shard(config, context), context)}), reply_to=msg)
