"""Asynchronous aggregation strategies: each arrival is weighed by its staleness, and the global
adapter moves without waiting for the slowest facility. The maths live in `aggregation`.

`submit` takes one validated update and returns the new global adapter when a new server
version is published, else None. Buffers and optimizer state are plain data, so the run loop can
checkpoint and restore them exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from chemfl.server_app.aggregation import (
    Params,
    ServerOptimizer,
    ServerOptimizerState,
    Staleness,
    delta,
    fedasync_mix,
    products,
    staleness_weight,
    svd_aggregate,
    weighted_mean_of_deltas,
)

LORA_AGGREGATIONS = ("naive", "svd")


@dataclass
class Update:
    node_id: int
    version_sent: int
    params: dict[str, np.ndarray]  # the node's trained adapter tensors
    num_examples: int
    train_loss: float


@dataclass
class Verdict:
    """What happened to one update: its staleness, its weight, whether it was used."""

    staleness: int
    weight: float
    accepted: bool
    reason: str = ""


def admit(version: int, update: Update, staleness: Staleness, max_staleness: int | None) -> Verdict:
    """The update's staleness and weight; refused ("stale") past the cutoff."""
    tau = version - update.version_sent
    weight = staleness_weight(tau, staleness, max_staleness)
    return Verdict(tau, weight, weight > 0.0, "" if weight > 0.0 else "stale")


@dataclass
class FedBuff:
    """FedBuff (Nguyen et al., AISTATS 2022): buffered asynchronous aggregation.

    Each arrival adds s(tau_i) * delta_i, delta_i = x_sent - y_i, to a buffer; after exactly K
    arrivals the server applies x <- x - eta_g * (sum_i s(tau_i) delta_i) / K (or feeds that
    mean to momentum / Adam), clears the buffer and publishes a new version. Updates staler than
    `max_staleness` are dropped and do not count towards K.

    LoRA: with `lora_aggregation = "naive"` A and B deltas are averaged separately, which is not
    the average of the updates B @ A (mean(B) mean(A) != mean(B A)); with FFA-LoRA (A frozen, only
    B exchanged) it is exact. `"svd"` aggregates the products B @ A and refactorises the result to
    rank r by truncated SVD (exact up to the rank-r truncation).
    """

    buffer_size: int = 3
    staleness: Staleness = field(default_factory=Staleness)
    max_staleness: int | None = None
    optimizer: ServerOptimizer = field(default_factory=ServerOptimizer)
    lora_aggregation: str = "naive"
    buffer: list[tuple[dict[str, np.ndarray], float]] = field(default_factory=list)
    optimizer_state: ServerOptimizerState = field(default_factory=ServerOptimizerState)

    def __post_init__(self) -> None:
        if self.buffer_size < 1:
            raise ValueError(f"buffer size K = {self.buffer_size} must be >= 1")
        if self.lora_aggregation not in LORA_AGGREGATIONS:
            raise ValueError(f"lora.aggregation = {self.lora_aggregation!r}; use one of {', '.join(LORA_AGGREGATIONS)}")

    def _space(self, params: Params) -> dict[str, np.ndarray]:
        return products(params) if self.lora_aggregation == "svd" else {k: np.asarray(v) for k, v in params.items()}

    def submit(self, current: Params, version: int, sent: Params, update: Update
               ) -> tuple[Verdict, dict[str, np.ndarray] | None]:
        verdict = admit(version, update, self.staleness, self.max_staleness)
        if not verdict.accepted:
            return verdict, None
        self.buffer.append((delta(self._space(sent), self._space(update.params)), verdict.weight))
        if len(self.buffer) < self.buffer_size:
            return verdict, None
        taken, self.buffer = self.buffer[: self.buffer_size], self.buffer[self.buffer_size:]
        mean = weighted_mean_of_deltas([d for d, _ in taken], [w for _, w in taken], self.buffer_size)
        moved = self.optimizer.apply(self._space(current), mean, self.optimizer_state)
        if self.lora_aggregation == "svd":
            moved = svd_aggregate(current, moved)
        return verdict, {k: v.astype(np.asarray(current[k]).dtype) for k, v in moved.items()}


@dataclass
class FedAsync:
    """FedAsync (Xie et al., 2019): every arrival is mixed in at once,
    x <- (1 - a_t) x + a_t x_k with a_t = alpha * s(tau); each arrival publishes a version.
    Updates staler than `max_staleness` are dropped."""

    alpha: float = 0.6
    staleness: Staleness = field(default_factory=lambda: Staleness("polynomial", a=0.5))
    max_staleness: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.alpha <= 1:
            raise ValueError(f"FedAsync alpha = {self.alpha} must be in (0, 1]")

    def submit(self, current: Params, version: int, sent: Mapping, update: Update
               ) -> tuple[Verdict, dict[str, np.ndarray] | None]:
        verdict = admit(version, update, self.staleness, self.max_staleness)
        if not verdict.accepted:
            return verdict, None
        return verdict, fedasync_mix(current, update.params, self.alpha * verdict.weight)
