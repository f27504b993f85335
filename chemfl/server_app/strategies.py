"""Strategy selection from the run config: `fedavg` (Flower's own FedAvg, synchronous rounds;
under virtual-time emulation the same rule run by the push/pull loop), `fedbuff`, `fedasync` and
`walltime-aware` (asynchronous, chemfl.server_app.async_strategies)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from chemfl.errors import ChemFLError
from chemfl.server_app.aggregation import ServerOptimizer, Staleness
from chemfl.server_app.async_strategies import FedAsync, FedAvgRounds, FedBuff, WalltimeAware

SYNCHRONOUS = ("fedavg",)
ASYNCHRONOUS = ("fedbuff", "fedasync", "walltime-aware")
STRATEGIES = SYNCHRONOUS + ASYNCHRONOUS

RoundListener = Callable[[int, dict], None]


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
        self._sent_bytes = sum(message.content["arrays"].count_bytes() for message in messages)
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
        self._facility_of.update({r.metadata.src_node_id: str(r.content["node"]["facility"]) for r in ok})
        self._listener(
            server_round,
            {
                # Dispatch to aggregated; with `node_train_seconds` (the nodes' own training time,
                # summed) it shows how much of a round goes to anything but training.
                "round_seconds": time.perf_counter() - self._round_started,
                "node_train_seconds": sum(float(r.content["metrics"]["seconds"]) for r in ok),
                "server_seconds": self._server_seconds,  # configuring messages + aggregating
                "facilities": sorted(self._facility_of[r.metadata.src_node_id] for r in ok),
                "failed_replies": len(replies) - len(ok),
                "bytes_sent": self._sent_bytes,
                "bytes_received": sum(r.content["arrays"].count_bytes() for r in ok),
                "train": dict(metrics) if metrics is not None else {},
            },
        )
        return arrays, metrics


def check_strategy_name(config: dict) -> str:
    name = str(config["strategy.name"])
    if name not in STRATEGIES:
        raise ChemFLError(f"unknown strategy.name {name!r}; use one of {', '.join(STRATEGIES)}")
    return name


def make_strategy(config: dict, listener: RoundListener) -> FedAvg:
    check_strategy_name(config)
    min_nodes = int(config["strategy.min-nodes"])
    return ObservedFedAvg(
        listener,
        fraction_train=float(config["strategy.fraction-train"]),
        fraction_evaluate=float(config["strategy.fraction-evaluate"]),
        min_train_nodes=min_nodes,
        min_evaluate_nodes=min_nodes,
        min_available_nodes=min_nodes,
    )


def make_async_strategy(config: dict) -> FedBuff | FedAsync | FedAvgRounds:
    """The strategy the push/pull loop runs, from the strategy.* and lora.aggregation knobs; bad
    values are errors. `fedavg` gets here only under virtual-time emulation."""
    name = check_strategy_name(config)
    if name == "fedavg":
        return FedAvgRounds(min_nodes=int(config["strategy.min-nodes"]))
    max_staleness = int(config["strategy.max-staleness"])
    try:
        staleness = Staleness(
            str(config["strategy.staleness"]),
            float(config["strategy.staleness-a"]),
            float(config["strategy.staleness-b"]),
        )
        cutoff = None if max_staleness < 0 else max_staleness
        if name == "fedasync":
            return FedAsync(alpha=float(config["strategy.fedasync-alpha"]), staleness=staleness, max_staleness=cutoff)
        if name == "walltime-aware":
            return WalltimeAware(
                alpha=float(config["strategy.fedasync-alpha"]),
                staleness=staleness,
                max_staleness=cutoff,
                base_steps=int(config["train.local-steps"]),
                min_steps=int(config["strategy.min-local-steps"]),
                max_steps=int(config["strategy.max-local-steps"]),
                margin_seconds=float(config["strategy.walltime-margin"]),
                momentum=float(config["strategy.estimate-momentum"]),
            )
        if config["lora.aggregation"] == "svd" and config["lora.freeze-a"]:
            raise ValueError(
                'lora.aggregation = "svd" needs both A and B; with lora.freeze-a the plain '
                'average is already exact: use lora.aggregation = "naive"'
            )
        return FedBuff(
            buffer_size=int(config["strategy.buffer-size"]),
            staleness=staleness,
            max_staleness=cutoff,
            optimizer=ServerOptimizer(
                str(config["strategy.server-optimizer"]),
                float(config["strategy.server-lr"]),
                float(config["strategy.server-beta1"]),
                float(config["strategy.server-beta2"]),
            ),
            lora_aggregation=str(config["lora.aggregation"]),
        )
    except ValueError as error:
        raise ChemFLError(f"strategy {name}: {error}") from error
