"""ChemFL's strategies as Flower strategies.

`FedBuff`, `FedAsync`, `WalltimeAware`, `FedCompass`, `FedQueue` and `FedAvgRounds` subclass Flower's `Strategy`: their
`start(grid=..., initial_arrays=..., num_rounds=..., timeout=..., train_config=..., evaluate_fn=...)`
runs the asynchronous push/pull loop (`async_loop`) and returns Flower's `Result`, so
`FedBuff(buffer_size=3)` drops into any ServerApp where Flower's `FedAvg` would. The rules they run
are plain data in `rules` (no Flower, no torch). In an asynchronous strategy one "round" is one
published server version: `num_rounds` versions are published, `timeout` is how long a dispatched
task may take before it is written off (the message TTL).

`ObservedFedAvg` is Flower's FedAvg unchanged, reporting per-round facts to ChemFL's metrics.jsonl.
Keyword defaults come from `chemfl.config.DEFAULTS` (pyproject's `[tool.flwr.app.config]`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from chemfl import protocol
from chemfl.config import DEFAULTS, split_list
from chemfl.protocol import NodeInfo, TrainReport
from chemfl.server_app.aggregation import ServerOptimizer, Staleness
from chemfl.server_app.async_loop import (
    AsyncRun,
    DeferredEvaluation,
    LoopSettings,
    Params,
    RecordKeys,
    Rule,
    to_record,
)
from chemfl.server_app.checkpoint import AsyncState, Checkpointer
from chemfl.server_app.rules import (
    FedAsyncRule,
    FedAvgRoundsRule,
    FedBuffRule,
    FedCompassRule,
    FedQueueRule,
    WalltimeAwareRule,
)
from chemfl.server_app.strategy_spec import StrategySpec

RoundListener = Callable[[int, dict], None]
DEFAULT_CLIENTS = len(split_list(str(DEFAULTS["data.facilities"])))  # N of FedCompass and FedQueue: data.facilities
MetricsAggregation = Callable[[list[RecordDict], str], MetricRecord]


class ObservedFedAvg(FedAvg):
    """Flower's FedAvg (McMahan et al., AISTATS 2017), x <- sum_k n_k/n x_k with n_k the node's
    number of training examples, unchanged. It only reports, per round, which facilities trained,
    the bytes sent and received, and failed replies, to a listener (metrics.jsonl, progress)."""

    def __init__(self, listener: RoundListener, **kwargs) -> None:
        super().__init__(**kwargs)
        self._listener = listener
        self._sent_bytes = 0
        self._round_started = 0.0
        self._server_seconds = 0.0
        self._facility_of: dict[int, str] = {}  # learnt from replies: node ids are all the server sees

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round_started = time.perf_counter()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._server_seconds = time.perf_counter() - self._round_started
        self._sent_bytes = sum(message.content[self.arrayrecord_key].count_bytes() for message in messages)
        names = [self._facility_of.get(m.metadata.dst_node_id, f"node {m.metadata.dst_node_id}") for m in messages]
        log(INFO, "round %d: training on %s", server_round, ", ".join(sorted(names)))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        aggregating = time.perf_counter()
        arrays, metrics = super().aggregate_train(server_round, replies)
        self._server_seconds += time.perf_counter() - aggregating
        ok = [reply for reply in replies if not reply.has_error()]
        self._facility_of.update(
            {r.metadata.src_node_id: NodeInfo.from_record(r.content[protocol.NODE]).facility for r in ok}
        )
        self._listener(
            server_round,
            {
                # Dispatch to aggregated; with `node_train_seconds` (the nodes' own training time,
                # summed) it shows how much of a round goes to anything but training.
                "round_seconds": time.perf_counter() - self._round_started,
                "node_train_seconds": sum(TrainReport.from_metrics(r.content[protocol.METRICS]).seconds for r in ok),
                "server_seconds": self._server_seconds,  # configuring messages + aggregating
                "facilities": sorted(self._facility_of[r.metadata.src_node_id] for r in ok),
                "failed_replies": len(replies) - len(ok),
                "bytes_sent": self._sent_bytes,
                "bytes_received": sum(r.content[self.arrayrecord_key].count_bytes() for r in ok),
                "train": dict(metrics) if metrics is not None else {},
            },
        )
        return arrays, metrics


@dataclass
class RunHooks:
    """What ChemFL's own ServerApp adds around the loop; a plain Flower ServerApp needs none."""

    record: Callable[[dict], None] = lambda line: None  # one metrics.jsonl line
    checkpointer: Checkpointer | None = None
    resume_state: AsyncState | None = None  # continue from a checkpoint
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    facility_of: dict[int, str] = field(default_factory=dict)  # node id -> facility, when known up front
    deferred_evaluation: DeferredEvaluation | None = None  # central evaluation elsewhere (eval.at)


class AsynchronousStrategy(Strategy):
    """Runs an asynchronous rule in the push/pull loop behind Flower's `Strategy.start`.

    Every idle online node gets the current global arrays (at most `concurrency` messages in flight,
    0 = one per online node); replies are taken as they arrive. `evaluate_fn(version, arrays)` is
    called at version 0, every `evaluate_every` versions (0: first and last only) and at the end;
    its `loss_key` metric stops the run at `target_loss` (0: no target). `max_seconds` bounds the
    wall clock (0: none); `max_update_norm` rejects updates with ||y - x_sent|| above it (0: none).
    `Result.train_metrics_clientapp[v]` aggregates (weighted by `weighted_by_key`) the metrics of
    the updates accepted into version v.
    """

    def __init__(
        self,
        rule: Rule,
        *,
        concurrency: int = int(DEFAULTS["strategy.concurrency"]),
        max_update_norm: float = float(DEFAULTS["strategy.max-update-norm"]),
        evaluate_every: int = int(DEFAULTS["eval.every"]),
        max_seconds: float = float(DEFAULTS["strategy.max-seconds"]),
        target_loss: float = float(DEFAULTS["strategy.target-loss"]),
        loss_key: str = protocol.EvalReport.KEYS["eval_loss"],
        weighted_by_key: str = protocol.NUM_EXAMPLES,
        arrayrecord_key: str = protocol.ARRAYS,
        configrecord_key: str = protocol.CONFIG,
        train_metrics_aggr_fn: MetricsAggregation | None = None,
    ) -> None:
        if concurrency < 0 or evaluate_every < 0:
            raise ValueError(f"concurrency ({concurrency}) and evaluate_every ({evaluate_every}) must be >= 0")
        self.concurrency = concurrency
        self.max_update_norm = max_update_norm
        self.evaluate_every = evaluate_every
        self.max_seconds = max_seconds
        self.target_loss = target_loss
        self.loss_key = loss_key
        self.weighted_by_key = weighted_by_key
        self.arrayrecord_key = arrayrecord_key
        self.configrecord_key = configrecord_key
        self.train_metrics_aggr_fn = train_metrics_aggr_fn or aggregate_metricrecords
        self.rule = rule

    @classmethod
    def with_rule(cls, rule: Rule, **loop: object) -> AsynchronousStrategy:
        """An instance of this strategy running an already-built rule (ChemFL's ServerApp builds
        rules from the run config; a Flower user passes arguments to the constructor instead)."""
        strategy = cls.__new__(cls)
        AsynchronousStrategy.__init__(strategy, rule, **loop)  # type: ignore[arg-type]
        return strategy

    def summary(self) -> None:
        log(INFO, "\t%s: %s", type(self).__name__, self.rule)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        hooks: RunHooks | None = None,
    ) -> Result:
        """Publish `num_rounds` server versions asynchronously; `evaluate_config` is unused (no
        federated evaluation rounds in an asynchronous run)."""
        del evaluate_config
        hooks = hooks or RunHooks()
        if num_rounds < 1 or timeout <= 0:
            raise ValueError(f"num_rounds ({num_rounds}) must be >= 1 and timeout ({timeout}) > 0")
        log(INFO, "Starting %s strategy: %d versions", type(self).__name__, num_rounds)
        self.summary()
        result = Result()
        updates_by_version: dict[int, list[RecordDict]] = {}

        def evaluate(version: int, params: Params) -> float | None:
            if evaluate_fn is None:
                return None
            metrics = evaluate_fn(version, to_record(params))
            if metrics is None:
                return None
            result.evaluate_metrics_serverapp[version] = metrics
            return float(metrics[self.loss_key]) if self.loss_key in metrics else None

        def on_update(version: int, metrics: dict) -> None:
            updates_by_version.setdefault(version, []).append(RecordDict({protocol.METRICS: MetricRecord(metrics)}))

        state = hooks.resume_state or AsyncState(params={name: array.numpy() for name, array in initial_arrays.items()})
        if isinstance(self.rule, FedQueueRule):  # queue delays count from the loop's clock at the start
            self.rule.run_start = state.elapsed
        run = AsyncRun(
            grid=grid,
            strategy=self.rule,
            state=state,
            settings=LoopSettings(
                num_versions=num_rounds,
                max_seconds=self.max_seconds,
                target_loss=self.target_loss,
                concurrency=self.concurrency,
                message_ttl=timeout,
                max_update_norm=self.max_update_norm,
                eval_every=self.evaluate_every,
            ),
            evaluate=evaluate,
            record=hooks.record,
            checkpointer=hooks.checkpointer,
            train_config=dict(train_config or {}),
            keys=RecordKeys(self.arrayrecord_key, self.configrecord_key, self.weighted_by_key),
            on_update=on_update,
            clock=hooks.clock,
            sleep=hooks.sleep,
            facility_of=dict(hooks.facility_of),
            deferred=hooks.deferred_evaluation,
        )
        result.arrays = to_record(run.run())
        for version, records in sorted(updates_by_version.items()):
            if any(self.weighted_by_key in record[protocol.METRICS] for record in records):
                result.train_metrics_clientapp[version] = self.train_metrics_aggr_fn(records, self.weighted_by_key)
        return result

    # An asynchronous strategy has no rounds for Flower's synchronous `start` to drive.
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        raise TypeError(f"{type(self).__name__} is asynchronous: run it with start(), not in synchronous rounds")

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        raise TypeError(f"{type(self).__name__} is asynchronous: run it with start(), not in synchronous rounds")

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # no federated evaluation rounds; centralized evaluation through evaluate_fn

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None


class FedBuff(AsynchronousStrategy):
    """FedBuff (Nguyen et al., AISTATS 2022): buffered asynchronous aggregation.

    Each arrival adds s(tau) (x_sent - y) to a buffer; after exactly `buffer_size` = K arrivals
    x <- x - server_lr * sum / K (or the mean feeds `server_optimizer` = momentum | adam).
    s(tau) is `staleness` (constant | polynomial | hinge | sqrt) with `staleness_a` / `_b`;
    updates staler than `max_staleness` (None: never) are dropped. `lora_aggregation = "svd"`
    aggregates LoRA products B @ A and refactorises to rank r (see rules.FedBuffRule).
    """

    def __init__(
        self,
        buffer_size: int = int(DEFAULTS["strategy.buffer-size"]),
        staleness: str = str(DEFAULTS["strategy.staleness"]),
        staleness_a: float = float(DEFAULTS["strategy.staleness-a"]),
        staleness_b: float = float(DEFAULTS["strategy.staleness-b"]),
        max_staleness: int | None = None,
        server_lr: float = float(DEFAULTS["strategy.server-lr"]),
        server_optimizer: str = str(DEFAULTS["strategy.server-optimizer"]),
        server_beta1: float = float(DEFAULTS["strategy.server-beta1"]),
        server_beta2: float = float(DEFAULTS["strategy.server-beta2"]),
        lora_aggregation: str = str(DEFAULTS["lora.aggregation"]),
        **loop: object,
    ) -> None:
        rule = FedBuffRule(
            buffer_size=buffer_size,
            staleness=Staleness(staleness, staleness_a, staleness_b),
            max_staleness=max_staleness,
            optimizer=ServerOptimizer(server_optimizer, server_lr, server_beta1, server_beta2),
            lora_aggregation=lora_aggregation,
        )
        super().__init__(rule, **loop)  # type: ignore[arg-type]


class FedAsync(AsynchronousStrategy):
    """FedAsync (Xie et al., 2019): every arrival is mixed in at once, x <- (1 - a) x + a x_k with
    a = alpha * s(tau); one version per arrival; updates staler than `max_staleness` dropped."""

    def __init__(
        self,
        alpha: float = float(DEFAULTS["strategy.fedasync-alpha"]),
        staleness: str = str(DEFAULTS["strategy.staleness"]),
        staleness_a: float = float(DEFAULTS["strategy.staleness-a"]),
        staleness_b: float = float(DEFAULTS["strategy.staleness-b"]),
        max_staleness: int | None = None,
        **loop: object,
    ) -> None:
        rule = FedAsyncRule(alpha, Staleness(staleness, staleness_a, staleness_b), max_staleness)
        super().__init__(rule, **loop)  # type: ignore[arg-type]


class WalltimeAware(AsynchronousStrategy):
    """Walltime-aware asynchronous aggregation (ChemFL): FedAsync's mixing, every task sized to fit
    its facility's batch job from what replies report (seconds per step, overhead, walltime left);
    no task is sent that cannot reach `min_local_steps` before the job ends (rules.WalltimeAwareRule).
    """

    def __init__(
        self,
        alpha: float = float(DEFAULTS["strategy.fedasync-alpha"]),
        staleness: str = str(DEFAULTS["strategy.staleness"]),
        staleness_a: float = float(DEFAULTS["strategy.staleness-a"]),
        staleness_b: float = float(DEFAULTS["strategy.staleness-b"]),
        max_staleness: int | None = None,
        local_steps: int = int(DEFAULTS["train.local-steps"]),
        min_local_steps: int = int(DEFAULTS["strategy.min-local-steps"]),
        max_local_steps: int = int(DEFAULTS["strategy.max-local-steps"]),
        walltime_margin: float = float(DEFAULTS["strategy.walltime-margin"]),
        estimate_momentum: float = float(DEFAULTS["strategy.estimate-momentum"]),
        **loop: object,
    ) -> None:
        rule = WalltimeAwareRule(
            alpha=alpha,
            staleness=Staleness(staleness, staleness_a, staleness_b),
            max_staleness=max_staleness,
            base_steps=local_steps,
            min_steps=min_local_steps,
            max_steps=max_local_steps,
            margin_seconds=walltime_margin,
            momentum=estimate_momentum,
        )
        super().__init__(rule, **loop)  # type: ignore[arg-type]


class FedCompass(AsynchronousStrategy):
    """FedCompass (Li et al., ICLR 2024): computing-power-aware semi-asynchronous aggregation. Each
    facility's seconds per step is learnt (moving average, newest weight `speed_momentum`); a task
    gets Q in [`min_local_steps`, `max_local_steps`] steps so that a group of nodes arrives
    together; a group aggregates when all its members are in or at its deadline (expected arrival
    x `latest_time_factor`): x <- (1 - sum a_i) x + sum a_i y_i, a_i = `alpha` s(tau_i) / `num_clients`,
    late updates joining the next group aggregation (rules.FedCompassRule).
    """

    def __init__(
        self,
        alpha: float = float(DEFAULTS["strategy.fedcompass-alpha"]),
        staleness: str = str(DEFAULTS["strategy.staleness"]),
        staleness_a: float = float(DEFAULTS["strategy.staleness-a"]),
        staleness_b: float = float(DEFAULTS["strategy.staleness-b"]),
        max_staleness: int | None = None,
        min_local_steps: int = int(DEFAULTS["strategy.fedcompass-min-steps"]),
        max_local_steps: int = int(DEFAULTS["strategy.fedcompass-max-steps"]),
        speed_momentum: float = float(DEFAULTS["strategy.fedcompass-speed-momentum"]),
        latest_time_factor: float = float(DEFAULTS["strategy.fedcompass-latest-time-factor"]),
        num_clients: int = DEFAULT_CLIENTS,
        **loop: object,
    ) -> None:
        rule = FedCompassRule(
            alpha=alpha,
            staleness=Staleness(staleness, staleness_a, staleness_b),
            max_staleness=max_staleness,
            min_steps=min_local_steps,
            max_steps=max_local_steps,
            speed_momentum=speed_momentum,
            latest_time_factor=latest_time_factor,
            num_clients=num_clients,
        )
        super().__init__(rule, **loop)  # type: ignore[arg-type]


class FedQueue(AsynchronousStrategy):
    """FedQueue (Li et al., arXiv 2605.02125, 2026): queue-aware rounds of `t_sync` seconds. Each
    facility's queue delay is predicted (moving average from `queue_init`); a task gets
    max(floor(J / seconds per step), `min_local_steps`) steps with J = max(0.5, t_sync - predicted
    wait - `safety_margin`) and learning-rate scale fewest steps / its steps; updates delayed past
    the predicted wait + `admission` x t_sync join the next round with their staleness; a round is
    aggregated when `num_clients` updates are in or (1 + `tolerance`) x t_sync after the last:
    x <- sum_k p_k y_k, p_k = phi(tau_k) E_k / sum_j E_j normalised (rules.FedQueueRule).
    """

    def __init__(
        self,
        t_sync: float = float(DEFAULTS["strategy.fedqueue-t-sync"]),
        queue_init: float = float(DEFAULTS["strategy.fedqueue-queue-init"]),
        queue_alpha: float = float(DEFAULTS["strategy.fedqueue-queue-alpha"]),
        compute_alpha: float = float(DEFAULTS["strategy.fedqueue-compute-alpha"]),
        safety_margin: float = float(DEFAULTS["strategy.fedqueue-safety-margin"]),
        min_local_steps: int = int(DEFAULTS["strategy.fedqueue-min-steps"]),
        admission: float = float(DEFAULTS["strategy.fedqueue-admission"]),
        tolerance: float = float(DEFAULTS["strategy.fedqueue-tolerance"]),
        staleness: str = str(DEFAULTS["strategy.fedqueue-staleness"]),
        staleness_beta: float = float(DEFAULTS["strategy.fedqueue-staleness-beta"]),
        num_clients: int = DEFAULT_CLIENTS,
        **loop: object,
    ) -> None:
        rule = FedQueueRule(
            t_sync=t_sync,
            q_init=queue_init,
            queue_alpha=queue_alpha,
            compute_alpha=compute_alpha,
            safety_margin=safety_margin,
            min_steps=min_local_steps,
            admission=admission,
            tolerance=tolerance,
            staleness=staleness,
            staleness_beta=staleness_beta,
            num_clients=num_clients,
        )
        super().__init__(rule, **loop)  # type: ignore[arg-type]


class FedAvgRounds(AsynchronousStrategy):
    """FedAvg (McMahan et al., AISTATS 2017) in the push/pull loop, for virtual-time campaigns:
    a round starts when nothing is in flight and `min_nodes` nodes are online, every online node
    gets the same version, x <- sum_k n_k x_k / n over the replies (rules.FedAvgRoundsRule)."""

    def __init__(self, min_nodes: int = int(DEFAULTS["strategy.min-nodes"]), **loop: object) -> None:
        rule = FedAvgRoundsRule(min_nodes)
        super().__init__(rule, **loop)  # type: ignore[arg-type]


def make_strategy(spec: StrategySpec, listener: RoundListener) -> ObservedFedAvg | AsynchronousStrategy:
    """The strategy a recipe selects: Flower's FedAvg for synchronous rounds in real time, else one
    of the asynchronous strategies (FedAvg rounds under virtual time) running the spec's rule."""
    if not spec.asynchronous:
        return ObservedFedAvg(
            listener,
            fraction_train=spec.fraction_train,
            fraction_evaluate=spec.fraction_evaluate,
            min_train_nodes=spec.min_nodes,
            min_evaluate_nodes=spec.min_nodes,
            min_available_nodes=spec.min_nodes,
        )
    strategy_class = {
        "fedbuff": FedBuff,
        "fedasync": FedAsync,
        "walltime-aware": WalltimeAware,
        "fedcompass": FedCompass,
        "fedqueue": FedQueue,
    }.get(spec.name, FedAvgRounds)
    return strategy_class.with_rule(
        spec.rule(),
        concurrency=spec.concurrency,
        max_update_norm=spec.max_update_norm,
        evaluate_every=spec.eval_every,
        max_seconds=spec.max_seconds,
        target_loss=spec.target_loss,
    )
