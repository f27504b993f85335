"""Virtual-time campaigns in seconds: the same strategies, loop and emulated batch jobs, with a
surrogate objective in place of the language model.

A campaign spanning days of virtual time runs hundreds of versions; with the real (tiny) model
each is a real training task and a real evaluation, minutes per campaign on a laptop, so a
multi-seed study of seven strategies on three campaigns would take a day. The surrogate keeps
everything a strategy sees and decides (the run loop, the rule, the emulated grid's queue waits,
walltimes, start-up, lost work, metrics.jsonl) and replaces only what a task computes:

- The model x has `shared_dims` directions every task uses (answer format, the vocabulary of
  SMILES and names) and, with data split by task group (`data.partition-scheme = "by-task"`, the
  seed paper's split), `task_dims` directions per facility that only its tasks use. Facility i's
  loss is f_i(x) = b + 1/2 sum_j m_ij a_j (x_j - c_ij)^2 over the directions it uses (m_ij = 1).
  Within each group of directions the curvatures a_j spread geometrically over `condition` (a few
  directions are learnt fast, the rest over hundreds of steps, as a fine-tuning loss flattens).
  The test loss is the mean of the f_i (the test set holds every task group). Any other partition
  (iid) shares every direction among all facilities.
- Non-IID data also moves each facility's optimum on the shared directions: c_ij = centre_j x
  (1 + heterogeneity x u_ij), u fixed per facility and centred over them (`by_task_heterogeneity`,
  else `iid_heterogeneity`), so local steps drift and a facility's own direction is not the
  federation's. Training on one task group also forgets the others: its steps pull the other
  facilities' directions back towards the untrained model (x_j -> 0) at `forgetting` x their
  curvature. Averaging the updates of facilities that hold different tasks divides each group's
  progress among them, a round or a mix dominated by one facility forgets the rest, and mixing a
  model trained from an older version pulls other groups' progress back: the effects that
  separate the rules on the real federation.
- A task runs `steps` SGD steps from the adapter it was sent, at `lr` x the task's lr-scale, with
  gradient noise `noise` (drawn from the campaign seed, the facility and the task id: a seed's
  campaign is the same on any machine and in any order). It reports steps x examples per step as
  num-examples and f_i at its end as its train loss.

The rules never see the difference: they receive ArrayRecords and the same reply metrics. What the
surrogate cannot tell is how much a real adapter gains from each step; bench/campaigns.py checks the
strategies' ranking against the real tiny model on one seed per campaign.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from chemfl import protocol
from chemfl.checks import RunSpecs, check_run_config
from chemfl.config import Scalar
from chemfl.emulation.grid import EmulatedReply, emulated_run
from chemfl.errors import ChemFLError
from chemfl.protocol import NodeInfo, Task, TrainReport
from chemfl.server_app.outputs import RunOutputs
from chemfl.server_app.strategies import AsynchronousStrategy, make_strategy

PARAMETER = "x"  # the surrogate's one "adapter" tensor


@dataclass(frozen=True)
class SurrogateObjective:
    """Per-facility quadratic losses; see the module docstring for the model and its defaults."""

    facilities: tuple[str, ...]
    by_task: bool
    examples_per_step: int
    shared_dims: int = 8
    task_dims: int = 8  # per facility, by-task only
    condition: float = 300.0  # largest / smallest curvature in a group of directions
    initial_excess: float = 3.0  # test loss at x = 0 above the pooled optimum's (a fresh adapter)
    floor: float = 1.0  # test loss at the pooled optimum
    lr: float = 0.4  # x the largest curvature: 5 steps learn the fastest directions almost whole
    noise: float = 0.1  # gradient noise per step, per unit curvature
    forgetting: float = 0.3  # pull of a facility's steps on the other facilities' directions
    iid_heterogeneity: float = 0.05
    by_task_heterogeneity: float = 0.5

    @classmethod
    def for_run(cls, config: dict[str, Scalar], specs: RunSpecs) -> SurrogateObjective:
        return cls(
            facilities=tuple(f.name for f in specs.campaign.facilities),
            by_task=str(config["data.partition-scheme"]) == "by-task",
            examples_per_step=specs.train.batch_size * specs.train.grad_accum,
        )

    @property
    def heterogeneity(self) -> float:
        return self.by_task_heterogeneity if self.by_task else self.iid_heterogeneity

    @cached_property
    def dims(self) -> int:
        return self.shared_dims + (self.task_dims * len(self.facilities) if self.by_task else 0)

    # Derived once per campaign (cached): every task and every evaluation reads them.
    @cached_property
    def curvatures(self) -> np.ndarray:
        groups = 1 + (len(self.facilities) if self.by_task else 0)
        sizes = [self.shared_dims] + [self.task_dims] * (groups - 1)
        return np.concatenate([np.geomspace(1.0, 1.0 / self.condition, size) for size in sizes])

    @cached_property
    def _masks(self) -> dict[str, np.ndarray]:
        masks = {}
        for index, facility in enumerate(self.facilities):
            mask = np.zeros(self.dims)
            mask[: self.shared_dims] = 1.0
            if self.by_task:
                first = self.shared_dims + self.task_dims * index
                mask[first : first + self.task_dims] = 1.0
            else:
                mask[:] = 1.0
            masks[facility] = mask
        return masks

    def uses(self, facility: str) -> np.ndarray:
        """m_i: 1 on the directions facility i's tasks use."""
        return self._masks[facility]

    @cached_property
    def centre(self) -> np.ndarray:
        """The pooled optimum; every direction holds the same share of the initial excess loss."""
        share = np.mean([self.uses(f) for f in self.facilities], axis=0)  # of the test loss each direction is in
        return np.sqrt(2.0 * self.initial_excess / (self.dims * self.curvatures * share))

    @cached_property
    def _optima(self) -> dict[str, np.ndarray]:
        directions = np.random.default_rng(7919).standard_normal((len(self.facilities), self.shared_dims))
        directions -= directions.mean(axis=0)  # centred: the pooled optimum stays the centre
        optima = {}
        for index, facility in enumerate(self.facilities):
            optimum = self.centre.copy()
            optimum[: self.shared_dims] *= 1.0 + self.heterogeneity * directions[index]
            optima[facility] = optimum
        return optima

    def optimum(self, facility: str) -> np.ndarray:
        return self._optima[facility]

    def _quadratic(self, x: np.ndarray, facility: str) -> float:
        return 0.5 * float(np.sum(self.uses(facility) * self.curvatures * (x - self.optimum(facility)) ** 2))

    @cached_property
    def _spread(self) -> float:
        """Mean over facilities of their loss at the pooled optimum: what no shared model escapes."""
        return float(np.mean([self._quadratic(self.centre, f) for f in self.facilities]))

    def loss(self, facility: str, x: np.ndarray) -> float:
        """f_i, offset so that the test loss (their mean) is `floor` at the pooled optimum."""
        return self.floor - self._spread + self._quadratic(x, facility)

    def test_loss(self, x: np.ndarray) -> float:
        return float(np.mean([self.loss(facility, x) for facility in self.facilities]))

    def train(self, facility: str, x: np.ndarray, steps: int, lr_scale: float, seed: list[int]) -> np.ndarray:
        """`steps` noisy gradient steps on f_i, forgetting the other facilities' directions."""
        rng = np.random.default_rng(seed)
        used = self.uses(facility)
        a, target, lr = self.curvatures * used, self.optimum(facility), self.lr * lr_scale
        forget = self.forgetting * self.curvatures * (1.0 - used)
        x = x.astype(np.float64).copy()
        for _ in range(steps):
            gradient = a * (x - target) + forget * x + self.noise * np.sqrt(a) * rng.standard_normal(self.dims)
            x -= lr * gradient
        return x

    def initial(self) -> ArrayRecord:
        return ArrayRecord({PARAMETER: Array(np.zeros(self.dims, dtype=np.float32))})


@dataclass
class SurrogateNodes:
    """The SuperNodes behind an EmulatedGrid: node i+1 serves facility i and trains the surrogate
    the moment a task is pushed (virtual time decides when the reply counts)."""

    objective: SurrogateObjective
    seed: int
    default_steps: int
    replies: dict[str, EmulatedReply] = field(default_factory=dict)

    def push_messages(self, messages: list[Message]) -> list[str]:
        return [self._train(message) for message in messages]

    def pull_messages(self, message_ids: list[str]) -> list[EmulatedReply]:
        return [self.replies.pop(message_id) for message_id in message_ids if message_id in self.replies]

    def _train(self, message: Message) -> str:
        node_id = message.metadata.dst_node_id
        facility = self.objective.facilities[node_id - 1]
        task = Task.from_config(message.content[protocol.CONFIG])
        steps = protocol.task_local_steps(task.local_steps, self.default_steps)
        sent = message.content[protocol.ARRAYS][PARAMETER].numpy()
        seed = [self.seed, node_id, task.task_id or 0]
        trained = self.objective.train(facility, sent, steps, task.lr_scale or 1.0, seed)
        report = TrainReport(
            num_examples=steps * self.objective.examples_per_step,
            train_loss=self.objective.loss(facility, trained),
            steps=steps,
            seconds=0.0,  # the emulated grid writes the virtual training time
            tokens_per_second=0.0,
        )
        content = RecordDict(
            {
                protocol.ARRAYS: ArrayRecord({PARAMETER: Array(trained.astype(np.float32))}),
                protocol.METRICS: MetricRecord(report.to_metrics()),
                protocol.NODE: ConfigRecord(NodeInfo(facility).to_record()),
            }
        )
        message_id = f"surrogate-{task.task_id}"  # the loop numbers every dispatch
        self.replies[message_id] = EmulatedReply(
            SimpleNamespace(src_node_id=node_id, reply_to_message_id=message_id), content=content
        )
        return message_id


def run_surrogate_campaign(config: dict[str, Scalar]) -> Path:
    """One emulated campaign of a resolved run config on the surrogate objective; its run folder
    (config.json + metrics.jsonl, as `chemfl report` reads them)."""
    specs = check_run_config(config)
    spec, campaign = specs.strategy, specs.campaign
    if campaign is None or spec.baseline:
        raise ChemFLError(
            "the surrogate objective runs emulated campaigns of a federated strategy: set "
            "emulation.virtual-time = true and strategy.name to fedavg, fedasync, fedbuff, fedcompass, "
            "fedqueue or walltime-aware"
        )
    strategy = make_strategy(spec, lambda server_round, info: None)
    assert isinstance(strategy, AsynchronousStrategy)  # virtual time runs FedAvg as rounds in the loop
    objective = SurrogateObjective.for_run(config, specs)
    outputs = RunOutputs(Path(str(config["outputs.dir"])), str(config["run-name"]))
    outputs.write_json("config.json", config)
    nodes = SurrogateNodes(objective, campaign.seed, spec.local_steps)
    real_node_of = {facility: index + 1 for index, facility in enumerate(objective.facilities)}
    emulated, hooks = emulated_run(
        nodes, campaign, real_node_of, spec, outputs.append_metrics, strategy.rule.next_due, objective="surrogate"
    )
    loss_key = protocol.EvalReport.KEYS["eval_loss"]

    def evaluate(version: int, arrays: ArrayRecord) -> MetricRecord:
        loss = objective.test_loss(arrays[PARAMETER].numpy().astype(np.float64))
        if not math.isfinite(loss):
            raise ChemFLError(f"surrogate test loss diverged at version {version}")
        return MetricRecord({loss_key: loss})

    with process_task_identity():
        strategy.start(
            grid=emulated,
            initial_arrays=objective.initial(),
            num_rounds=spec.num_versions,
            timeout=spec.message_ttl,
            train_config=ConfigRecord(Task().to_config()),
            evaluate_fn=evaluate,
            hooks=hooks,
        )
    emulated.finish()
    return outputs.dir


@contextmanager
def process_task_identity() -> Iterator[None]:
    """Flower (1.42) stamps every Message with the run id of the ServerApp process that builds it;
    a surrogate campaign has no SuperLink and no run, so it stands in as run 0 while it runs."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    if saved[0] is None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 0, 0, 0
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
