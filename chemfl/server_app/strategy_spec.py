"""Every `strategy.*` knob (and the few others a strategy reads) parsed and checked in one place.

No Flower, no torch: the ServerApp, the benchmarks and `chemfl simulate`'s up-front checks all
read the same spec. Defaults are pyproject's, through `chemfl.config.resolve`; nothing here
repeats them.
"""

from __future__ import annotations

from dataclasses import dataclass

from chemfl.config import Scalar, split_list
from chemfl.errors import ChemFLError
from chemfl.server_app.aggregation import ServerOptimizer, Staleness
from chemfl.server_app.rules import (
    LORA_AGGREGATIONS,
    FedAsyncRule,
    FedAvgRoundsRule,
    FedBuffRule,
    FedCompassRule,
    FedQueueRule,
    WalltimeAwareRule,
)

SYNCHRONOUS = ("fedavg",)
ASYNCHRONOUS = ("fedbuff", "fedasync", "walltime-aware", "fedcompass", "fedqueue")  # run in the push/pull loop
# No federation, for comparison: trained in the ServerApp's process (chemfl.server_app.baselines).
BASELINES = ("centralized", "local")
AnyRule = FedBuffRule | FedAsyncRule | FedAvgRoundsRule | WalltimeAwareRule | FedCompassRule | FedQueueRule
STRATEGIES = SYNCHRONOUS + ASYNCHRONOUS + BASELINES
# The federated runs whose total optimizer steps a baseline can match (the others size tasks as they go).
BASELINE_MATCHES = ("fedavg", "fedbuff", "fedasync")


@dataclass(frozen=True)
class StrategySpec:
    name: str
    virtual_time: bool  # emulation.virtual-time: every strategy, FedAvg included, runs in the push/pull loop
    # synchronous FedAvg (Flower's own)
    num_rounds: int
    fraction_train: float
    fraction_evaluate: float
    min_nodes: int
    round_timeout: float
    # the asynchronous loop
    num_versions: int
    max_seconds: float
    target_loss: float
    concurrency: int
    message_ttl: float
    max_update_norm: float
    eval_every: int
    # the rules
    buffer_size: int
    staleness: Staleness
    max_staleness: int | None  # None: never drop
    server_optimizer: ServerOptimizer
    fedasync_alpha: float
    lora_aggregation: str
    local_steps: int  # train.local-steps: a task's steps unless the strategy sizes it
    min_local_steps: int
    max_local_steps: int
    walltime_margin: float
    estimate_momentum: float
    num_clients: int  # the facilities of data.facilities: FedCompass's and FedQueue's N
    fedcompass_alpha: float
    fedcompass_min_steps: int
    fedcompass_max_steps: int
    fedcompass_speed_momentum: float
    fedcompass_latest_time_factor: float
    fedqueue_t_sync: float
    fedqueue_queue_init: float
    fedqueue_queue_alpha: float
    fedqueue_compute_alpha: float
    fedqueue_safety_margin: float
    fedqueue_min_steps: int
    fedqueue_admission: float
    fedqueue_tolerance: float
    fedqueue_staleness: str
    fedqueue_staleness_beta: float
    # the baselines
    baseline_steps: int  # 0: match the federated run of baseline_match
    baseline_match: str

    @property
    def asynchronous(self) -> bool:
        """Runs in the push/pull loop (Flower's FedAvg waits on the real clock, so not under virtual time)."""
        return self.name in ASYNCHRONOUS or self.virtual_time

    @property
    def baseline(self) -> bool:
        return self.name in BASELINES

    @property
    def nodes_per_round(self) -> int:
        """Facilities Flower's FedAvg trains each round (one SuperNode each): max(int(N x
        fraction-train), min-nodes) as Flower samples them, at most the N facilities."""
        return min(self.num_clients, max(int(self.num_clients * self.fraction_train), self.min_nodes))

    def matched_steps(self) -> int:
        """Optimizer steps of each baseline model: `strategy.baseline-steps`, or (0) the total of the
        federated run it is compared with, named by `strategy.baseline-match`, under these settings:
        fedavg num-rounds x facilities per round x local-steps, fedbuff num-versions x buffer-size x
        local-steps, fedasync num-versions x local-steps (its updates are each local-steps long).
        The centralized model and every facility's local model each train this many steps, so each
        sees as many examples as the whole federation did."""
        if self.baseline_steps > 0:
            return self.baseline_steps
        updates = {
            "fedavg": self.num_rounds * self.nodes_per_round,
            "fedbuff": self.num_versions * self.buffer_size,
            "fedasync": self.num_versions,
        }[self.baseline_match]
        return updates * self.local_steps

    @classmethod
    def from_config(cls, config: dict[str, Scalar]) -> StrategySpec:
        """From a resolved run config; every bad value is a ChemFLError naming the knob."""
        name = str(config["strategy.name"])
        if name not in STRATEGIES:
            raise ChemFLError(f"unknown strategy.name {name!r}; use one of {', '.join(STRATEGIES)}")
        max_staleness = int(config["strategy.max-staleness"])
        try:
            spec = cls(
                name=name,
                virtual_time=bool(config["emulation.virtual-time"]),
                num_rounds=int(config["strategy.num-rounds"]),
                fraction_train=float(config["strategy.fraction-train"]),
                fraction_evaluate=float(config["strategy.fraction-evaluate"]),
                min_nodes=int(config["strategy.min-nodes"]),
                round_timeout=float(config["strategy.round-timeout"]),
                num_versions=int(config["strategy.num-versions"]),
                max_seconds=float(config["strategy.max-seconds"]),
                target_loss=float(config["strategy.target-loss"]),
                concurrency=int(config["strategy.concurrency"]),
                message_ttl=float(config["strategy.message-ttl"]),
                max_update_norm=float(config["strategy.max-update-norm"]),
                eval_every=int(config["eval.every"]),
                buffer_size=int(config["strategy.buffer-size"]),
                staleness=Staleness(
                    str(config["strategy.staleness"]),
                    float(config["strategy.staleness-a"]),
                    float(config["strategy.staleness-b"]),
                ),
                max_staleness=None if max_staleness < 0 else max_staleness,
                server_optimizer=ServerOptimizer(
                    str(config["strategy.server-optimizer"]),
                    float(config["strategy.server-lr"]),
                    float(config["strategy.server-beta1"]),
                    float(config["strategy.server-beta2"]),
                ),
                fedasync_alpha=float(config["strategy.fedasync-alpha"]),
                lora_aggregation=str(config["lora.aggregation"]),
                local_steps=int(config["train.local-steps"]),
                min_local_steps=int(config["strategy.min-local-steps"]),
                max_local_steps=int(config["strategy.max-local-steps"]),
                walltime_margin=float(config["strategy.walltime-margin"]),
                estimate_momentum=float(config["strategy.estimate-momentum"]),
                num_clients=len(split_list(str(config["data.facilities"]))),
                fedcompass_alpha=float(config["strategy.fedcompass-alpha"]),
                fedcompass_min_steps=int(config["strategy.fedcompass-min-steps"]),
                fedcompass_max_steps=int(config["strategy.fedcompass-max-steps"]),
                fedcompass_speed_momentum=float(config["strategy.fedcompass-speed-momentum"]),
                fedcompass_latest_time_factor=float(config["strategy.fedcompass-latest-time-factor"]),
                fedqueue_t_sync=float(config["strategy.fedqueue-t-sync"]),
                fedqueue_queue_init=float(config["strategy.fedqueue-queue-init"]),
                fedqueue_queue_alpha=float(config["strategy.fedqueue-queue-alpha"]),
                fedqueue_compute_alpha=float(config["strategy.fedqueue-compute-alpha"]),
                fedqueue_safety_margin=float(config["strategy.fedqueue-safety-margin"]),
                fedqueue_min_steps=int(config["strategy.fedqueue-min-steps"]),
                fedqueue_admission=float(config["strategy.fedqueue-admission"]),
                fedqueue_tolerance=float(config["strategy.fedqueue-tolerance"]),
                fedqueue_staleness=str(config["strategy.fedqueue-staleness"]),
                fedqueue_staleness_beta=float(config["strategy.fedqueue-staleness-beta"]),
                baseline_steps=int(config["strategy.baseline-steps"]),
                baseline_match=str(config["strategy.baseline-match"]),
            )
            spec.check(freeze_a=bool(config["lora.freeze-a"]))
            spec.rule()  # the rule checks its own arguments
        except ValueError as error:
            raise ChemFLError(f"strategy {name}: {error}") from error
        return spec

    def check(self, freeze_a: bool) -> None:
        """Values each rule's constructor cannot see on its own (the rules check the rest)."""
        if self.concurrency < 0:
            raise ValueError(f"strategy.concurrency = {self.concurrency} must be >= 0 (0: every online node)")
        if self.num_versions < 1:
            raise ValueError(f"strategy.num-versions = {self.num_versions} must be >= 1")
        if self.message_ttl <= 0:
            raise ValueError(f"strategy.message-ttl = {self.message_ttl} must be > 0 seconds")
        if self.num_rounds < 1:
            raise ValueError(f"strategy.num-rounds = {self.num_rounds} must be >= 1")
        if not 0 < self.fraction_train <= 1 or not 0 <= self.fraction_evaluate <= 1:
            raise ValueError(
                f"strategy.fraction-train = {self.fraction_train} must be in (0, 1] and strategy.fraction-evaluate "
                f"= {self.fraction_evaluate} in [0, 1]"
            )
        if self.min_nodes < 1:
            raise ValueError(f"strategy.min-nodes = {self.min_nodes} must be >= 1")
        for key, value in (
            ("strategy.round-timeout", self.round_timeout),
            ("strategy.max-seconds", self.max_seconds),
            ("strategy.max-update-norm", self.max_update_norm),
            ("strategy.target-loss", self.target_loss),
        ):
            if value < 0 or (key == "strategy.round-timeout" and value == 0):
                raise ValueError(f"{key} = {value} must be {'> 0' if key == 'strategy.round-timeout' else '>= 0'}")
        if self.eval_every < 0:
            raise ValueError(f"eval.every = {self.eval_every} must be >= 0 (0: first and last only)")
        if self.lora_aggregation not in LORA_AGGREGATIONS:
            raise ValueError(f"lora.aggregation = {self.lora_aggregation!r}; use one of {', '.join(LORA_AGGREGATIONS)}")
        if self.baseline_steps < 0:
            raise ValueError(
                f"strategy.baseline-steps = {self.baseline_steps} must be >= 0 (0: as many as strategy.baseline-match)"
            )
        if self.baseline_match not in BASELINE_MATCHES:
            raise ValueError(
                f"strategy.baseline-match = {self.baseline_match!r}; use one of {', '.join(BASELINE_MATCHES)}, or "
                "set strategy.baseline-steps to the federated run's total optimizer steps (its update lines' steps)"
            )
        if self.baseline and self.virtual_time:
            raise ValueError(
                "baselines train in the ServerApp's process in real time: set emulation.virtual-time = false"
            )
        if self.name == "fedbuff" and self.lora_aggregation == "svd" and freeze_a:
            raise ValueError(
                'lora.aggregation = "svd" needs both A and B; with lora.freeze-a the plain '
                'average is already exact: use lora.aggregation = "naive"'
            )

    def rule(self) -> AnyRule:
        """The asynchronous rule this spec selects (FedAvg rounds for `fedavg` under virtual time)."""
        if self.name == "fedavg":
            return FedAvgRoundsRule(self.min_nodes)
        if self.name == "fedcompass":
            return FedCompassRule(
                alpha=self.fedcompass_alpha,
                staleness=self.staleness,
                max_staleness=self.max_staleness,
                min_steps=self.fedcompass_min_steps,
                max_steps=self.fedcompass_max_steps,
                speed_momentum=self.fedcompass_speed_momentum,
                latest_time_factor=self.fedcompass_latest_time_factor,
                num_clients=self.num_clients,
            )
        if self.name == "fedqueue":
            return FedQueueRule(
                t_sync=self.fedqueue_t_sync,
                q_init=self.fedqueue_queue_init,
                queue_alpha=self.fedqueue_queue_alpha,
                compute_alpha=self.fedqueue_compute_alpha,
                safety_margin=self.fedqueue_safety_margin,
                min_steps=self.fedqueue_min_steps,
                admission=self.fedqueue_admission,
                tolerance=self.fedqueue_tolerance,
                staleness=self.fedqueue_staleness,
                staleness_beta=self.fedqueue_staleness_beta,
                num_clients=self.num_clients,
            )
        if self.name == "fedasync":
            return FedAsyncRule(self.fedasync_alpha, self.staleness, self.max_staleness)
        if self.name == "walltime-aware":
            return WalltimeAwareRule(
                alpha=self.fedasync_alpha,
                staleness=self.staleness,
                max_staleness=self.max_staleness,
                base_steps=self.local_steps,
                min_steps=self.min_local_steps,
                max_steps=self.max_local_steps,
                margin_seconds=self.walltime_margin,
                momentum=self.estimate_momentum,
            )
        return FedBuffRule(
            self.buffer_size, self.staleness, self.max_staleness, self.server_optimizer, self.lora_aggregation
        )
