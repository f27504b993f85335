"""The contract between ChemFL's parts, defined once: what travels in Flower messages between the
ServerApp and the ClientApp (and the emulated grid between them), and the metrics.jsonl lines the
server writes and `chemfl report` and the benchmarks read back.

Plain Python, no Flower and no torch: both apps wrap these dicts in Flower's records, and the
report reads run folders without either installed. Every key's literal lives here only; a renamed
key is changed in one place and fails loudly everywhere else (AttributeError, not a silent miss).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

# --- messages -------------------------------------------------------------------------------------

# Record names inside a message's RecordDict. "arrays", "config" and "num-examples" are also the
# defaults of Flower's strategies (arrayrecord_key, configrecord_key, weighted_by_key).
ARRAYS = "arrays"  # ArrayRecord: the adapter, both ways
ADAPTER = "adapter"  # its one array: every exchanged LoRA tensor in one vector (chemfl.llm.packing)
CONFIG = "config"  # ConfigRecord: the task (server -> node)
METRICS = "metrics"  # MetricRecord: what training or evaluation measured (node -> server)
NODE = "node"  # ConfigRecord: who replied (node -> server)
EVALUATION = "evaluation"  # ConfigRecord: a facility's evaluation of the global adapter on the test set
EVALUATION_RESULT = "result"  # its one key: the result as JSON (per-task metrics nest, records do not)

# Message types the ClientApp handles.
TRAIN, EVALUATE, QUERY = "train", "evaluate", "query"

NUM_EXAMPLES = "num-examples"  # the weight of a node's update (McMahan et al.'s n_k)


class NodeConfig:
    """Keys of a SuperNode's node config (`flower-supernode --node-config`), as the launcher's
    scripts write them and the ClientApp reads them."""

    FACILITY = "facility"
    DATA_PATH = "data-path"  # the facility's shard folder (deployment)
    DATA_SLICE = "data-slice"  # "i/n": this SuperNode's slice of the shard (per-GPU layout)
    JOB_END_TIME = "job-end-time"  # epoch seconds the batch job ends
    TRAINER = "trainer"  # "unix:/path/to/socket": relay tasks to the facility trainer (per-job layout)
    TRAINER_SECRET_FILE = "trainer-secret-file"  # the per-job secret the trainer authenticates with


def task_local_steps(task_steps: int | None, train_local_steps: int) -> int:
    """The local optimizer steps of one task: what the strategy planned for it, else the run's
    `train.local-steps`. The one rule the ClientApp, the emulated grid and the strategies share."""
    return max(1, int(task_steps)) if task_steps is not None else int(train_local_steps)


@dataclass(frozen=True)
class Task:
    """The `config` record of a train (or evaluate) message.

    `server_round` is Flower's own key (its FedAvg sets it); `task_id` numbers asynchronous
    dispatches, so each task gets its own batch order; `local_steps` is set when a strategy sizes
    the task (e.g. to fit the walltime left); `lora_a_digest` is FFA-LoRA's frozen-A check;
    `adapter_layout` is the digest of the packed adapter's layout (chemfl.llm.packing), checked before
    a node loads it; `evaluate_on = "test"` asks an evaluate handler for the central evaluation on the held-out test
    set (`eval.at = <facility>`) instead of the loss on the node's validation shard; `lr_scale` is set when a
    strategy scales the task's learning rate (FedQueue: train.lr x fewest steps / its steps).
    """

    server_round: int | None = None
    task_id: int | None = None
    local_steps: int | None = None
    lora_a_digest: str | None = None
    evaluate_on: str | None = None
    adapter_layout: str | None = None
    lr_scale: float | None = None

    KEYS: ClassVar[dict[str, str]] = {
        "server_round": "server-round",
        "task_id": "task-id",
        "local_steps": "local-steps",
        "lora_a_digest": "lora-a-digest",
        "evaluate_on": "evaluate-on",
        "adapter_layout": "adapter-layout",
        "lr_scale": "lr-scale",
    }
    TEST_SET: ClassVar[str] = "test"

    def to_config(self) -> dict[str, Any]:
        return _to_keys(self, self.KEYS)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Task:
        return cls(**_from_keys(config, cls.KEYS))

    @property
    def batch_order_key(self) -> int:
        """What makes a task's batch order differ from every other task's: its id, else its round."""
        return self.task_id if self.task_id is not None else (self.server_round or 0)


@dataclass(frozen=True)
class TrainReport:
    """The `metrics` record of a train reply: exactly these scalars leave a node after training."""

    num_examples: int
    train_loss: float
    steps: int
    seconds: float
    tokens_per_second: float

    KEYS: ClassVar[dict[str, str]] = {
        "num_examples": NUM_EXAMPLES,
        "train_loss": "train-loss",
        "steps": "steps",
        "seconds": "seconds",
        "tokens_per_second": "tokens-per-second",
    }

    def to_metrics(self) -> dict[str, int | float]:
        return _to_keys(self, self.KEYS)

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any]) -> TrainReport:
        return cls(**_from_keys(metrics, cls.KEYS, required=True))


@dataclass(frozen=True)
class PartialTrainReport:
    """A train reply's metrics as far as they are present (a reply from a foreign or broken node
    may lack some): the asynchronous loop reads what it can and validates the rest."""

    num_examples: int = 0
    train_loss: float | None = None
    steps: int | None = None
    seconds: float | None = None

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any]) -> PartialTrainReport:
        keys = {name: TrainReport.KEYS[name] for name in ("num_examples", "train_loss", "steps", "seconds")}
        return cls(**_from_keys(metrics, keys))


@dataclass(frozen=True)
class EvalReport:
    """The `metrics` record of an evaluate reply."""

    num_examples: int
    eval_loss: float
    exact_match: float | None = None

    KEYS: ClassVar[dict[str, str]] = {
        "num_examples": NUM_EXAMPLES,
        "eval_loss": "eval-loss",
        "exact_match": "exact-match",
    }

    def to_metrics(self) -> dict[str, int | float]:
        return _to_keys(self, self.KEYS)

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any]) -> EvalReport:
        return cls(**_from_keys(metrics, cls.KEYS))


@dataclass(frozen=True)
class NodeInfo:
    """The `node` record of every reply: the facility's name and, inside a batch job, the seconds
    of walltime its job has left (strategies size work to fit it)."""

    facility: str
    walltime_remaining: float | None = None

    KEYS: ClassVar[dict[str, str]] = {"facility": "facility", "walltime_remaining": "walltime-remaining"}

    def to_record(self) -> dict[str, str | float]:
        return _to_keys(self, self.KEYS)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> NodeInfo:
        return cls(**_from_keys(record, cls.KEYS, required=("facility",)))


def _to_keys(instance: Any, keys: Mapping[str, str]) -> dict[str, Any]:
    """Dataclass fields -> wire keys, leaving out fields that are None (Flower records hold no None)."""
    values = {name: getattr(instance, name) for name in keys}
    return {keys[name]: value for name, value in values.items() if value is not None}


def _from_keys(record: Mapping[str, Any], keys: Mapping[str, str], required: bool | tuple = False) -> dict:
    needed = set(keys) if required is True else set(required or ())
    missing = sorted(keys[name] for name in needed if keys[name] not in record)
    if missing:
        raise KeyError(f"missing {', '.join(missing)}")
    return {name: record[key] for name, key in keys.items() if key in record}


# --- metrics.jsonl --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunLine:
    """First line of an emulated campaign or of a baseline run (strategy centralized or local):
    what ran, and each facility's shape."""

    EVENT: ClassVar[str] = "run"
    strategy: str
    campaign: str = ""
    seed: int | None = None
    virtual_time: bool = False
    facilities: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> {nodes, supernodes}
    objective: str = ""  # emulated campaigns: "model" (real training) or "surrogate" (chemfl.emulation.surrogate)


@dataclass(frozen=True)
class RoundLine:
    """One synchronous FedAvg round (round 0: the initial adapter's evaluation)."""

    EVENT: ClassVar[str] = "round"
    round: int
    wall_time: float
    facilities: list[str] = field(default_factory=list)  # facilities that trained this round
    train: dict[str, float] = field(default_factory=dict)  # Flower's aggregated train metrics
    failed_replies: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    round_seconds: float | None = None  # dispatch to aggregated
    node_train_seconds: float | None = None  # the nodes' own training time, summed
    server_seconds: float | None = None  # configuring messages + aggregating
    eval: dict | None = None  # centralized evaluation (chemfl.llm.evaluation's result)


@dataclass(frozen=True)
class VersionLine:
    """A server version published by the asynchronous loop (version 0: the initial adapter)."""

    EVENT: ClassVar[str] = "version"
    version: int
    wall_time: float
    counters: dict[str, int] = field(default_factory=dict)  # accepted / stale / rejected / lost so far
    updates_by_facility: dict[str, int] = field(default_factory=dict)
    server_seconds: float = 0.0
    evaluation_seconds: float = 0.0
    eval_loss: float | None = None
    eval: dict | None = None  # the centralized evaluation's full result when the server evaluated (per-task metrics)


@dataclass(frozen=True)
class EvaluationLine:
    """A central evaluation that a facility ran (`eval.at = <facility>`): it arrives after the
    version it evaluates, so it carries that version's time; training never waited for it.
    Baseline runs (strategy centralized or local) write one per evaluation too, run by the server."""

    EVENT: ClassVar[str] = "evaluation"
    version: int  # the round (FedAvg) or version (asynchronous) evaluated; baselines: 0 before training, 1 after
    version_time: float  # when that version was published
    wall_time: float  # when the result arrived
    facility: str  # where it ran: a facility, or "server"
    eval_loss: float
    eval: dict = field(default_factory=dict)  # chemfl.llm.evaluation's result, as the server computes it
    adapter: str | None = None  # the adapter folder evaluated where a run keeps several (local: adapter-<facility>)


@dataclass(frozen=True)
class TrainingLine:
    """One model a baseline trained in the ServerApp's process (strategy centralized: every facility's
    shard pooled; local: one facility's shard): what it trained on and how much."""

    EVENT: ClassVar[str] = "training"
    adapter: str  # the run folder's adapter it was saved as: "adapter" or "adapter-<facility>"
    facilities: list[str]  # whose training shards
    records: int  # training records in those shards
    steps: int  # optimizer steps
    examples: int  # examples drawn: steps x train.batch-size x train.grad-accum
    train_loss: float  # mean over the steps
    seconds: float
    wall_time: float  # when training ended


@dataclass(frozen=True)
class UpdateLine:
    """One trained update that reached the server, used or not."""

    EVENT: ClassVar[str] = "update"
    node: int
    facility: str | None
    version_sent: int
    version: int  # the version it met
    staleness: int
    weight: float
    accepted: bool
    reason: str  # "" when accepted; "stale", "rejected: ..." otherwise
    arrival_time: float
    train_loss: float | None = None
    train_seconds: float | None = None
    dispatch_time: float | None = None
    steps: int | None = None
    walltime_remaining: float | None = None


@dataclass(frozen=True)
class LostLine:
    """Work sent to a node that never came back (node gone, error reply, walltime end)."""

    EVENT: ClassVar[str] = "lost"
    node: int | None
    facility: str | None
    version_sent: int
    reason: str
    time: float
    dispatch_time: float | None = None
    steps: int | None = None


@dataclass(frozen=True)
class JobLine:
    """A batch job of an emulated campaign changing state."""

    EVENT: ClassVar[str] = "job"
    STATES: ClassVar[tuple[str, ...]] = ("queued", "running", "ended")
    facility: str
    job: int
    state: str  # one of STATES
    time: float
    nodes: int = 1
    reason: str | None = None

    def __post_init__(self) -> None:
        if self.state not in self.STATES:
            raise ValueError(f"job state {self.state!r} is not one of {', '.join(self.STATES)}")


MetricsLine = RunLine | RoundLine | VersionLine | EvaluationLine | TrainingLine | UpdateLine | LostLine | JobLine
LINE_TYPES: dict[str, type] = {
    kind.EVENT: kind
    for kind in (RunLine, RoundLine, VersionLine, EvaluationLine, TrainingLine, UpdateLine, LostLine, JobLine)
}


def to_json(line: MetricsLine) -> dict[str, Any]:
    """The JSON object of one metrics.jsonl line: `event` plus every field (None as null)."""
    return {"event": line.EVENT, **dataclasses.asdict(line)}


def from_json(data: Mapping[str, Any]) -> MetricsLine | None:
    """The typed line, or None for an event this version does not know (readers skip it). Fields
    this version does not know are ignored (newer writers); a missing required field raises
    TypeError. Round lines written before they carried an `event` key are recognised by `round`."""
    event = data.get("event", RoundLine.EVENT if "round" in data else None)
    kind = LINE_TYPES.get(event)
    if kind is None:
        return None
    names = {f.name for f in dataclasses.fields(kind)}
    return kind(**{name: value for name, value in data.items() if name in names})
