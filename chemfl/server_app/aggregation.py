"""Aggregation maths as pure functions on numpy arrays: no Flower, no torch.

An adapter is a `Params` mapping of tensor name to array. Staleness tau is the number of server
versions published between the version a node was sent and the version its update meets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

Params = Mapping[str, np.ndarray]

STALENESS_FUNCTIONS = ("constant", "polynomial", "hinge", "sqrt")
SERVER_OPTIMIZERS = ("sgd", "momentum", "adam")


@dataclass(frozen=True)
class Staleness:
    """s(tau) in (0, 1], non-increasing in tau (Xie et al. 2019; Nguyen et al. 2022).

    constant: 1; polynomial: (tau + 1)^-a; hinge: 1 if tau <= b else 1 / (a (tau - b) + 1);
    sqrt: 1 / sqrt(1 + tau), FedBuff's default (polynomial with a = 0.5).
    """

    name: str
    a: float
    b: float

    def __post_init__(self) -> None:
        if self.name not in STALENESS_FUNCTIONS:
            raise ValueError(f"unknown staleness function {self.name!r}; use one of {', '.join(STALENESS_FUNCTIONS)}")
        if self.a < 0 or self.b < 0:
            raise ValueError(f"staleness parameters must be >= 0 (a = {self.a}, b = {self.b})")

    def __call__(self, tau: int) -> float:
        if tau < 0:
            raise ValueError(f"staleness {tau} < 0: an update cannot come from a future version")
        if self.name == "constant":
            return 1.0
        if self.name == "sqrt":
            return 1.0 / math.sqrt(1.0 + tau)
        if self.name == "polynomial":
            return float((tau + 1.0) ** -self.a)
        return 1.0 if tau <= self.b else 1.0 / (self.a * (tau - self.b) + 1.0)


def staleness_weight(tau: int, staleness: Staleness, max_staleness: int | None) -> float:
    """The weight of an update of staleness tau; 0 past the cutoff (the update changes nothing)."""
    if max_staleness is not None and tau > max_staleness:
        return 0.0
    return staleness(tau)


def delta(sent: Params, trained: Params) -> dict[str, np.ndarray]:
    """FedBuff's client update: what was sent minus what came back (x_sent - y_Q)."""
    return {
        name: np.asarray(sent[name], dtype=np.float64) - np.asarray(trained[name], dtype=np.float64) for name in sent
    }


def weighted_mean_of_deltas(deltas: Sequence[Params], weights: Sequence[float], divisor: int) -> dict[str, np.ndarray]:
    """sum_i w_i delta_i / divisor: FedBuff divides by the buffer size K, not by sum(w)."""
    names = deltas[0].keys()
    return {
        name: sum(w * np.asarray(d[name], dtype=np.float64) for d, w in zip(deltas, weights, strict=False)) / divisor
        for name in names
    }


@dataclass
class ServerOptimizerState:
    step: int = 0
    first_moment: dict[str, np.ndarray] = field(default_factory=dict)
    second_moment: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class ServerOptimizer:
    """x <- x - lr * g for the aggregated pseudo-gradient g (the mean delta).

    sgd: plain FedBuff; momentum: m <- beta1 m + g, x <- x - lr m (FedAvgM); adam: FedAdam's
    update (Reddi et al. 2021) with bias correction.
    """

    name: str
    lr: float
    beta1: float
    beta2: float
    epsilon: float = 1e-8

    def __post_init__(self) -> None:
        if self.name not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown server optimizer {self.name!r}; use one of {', '.join(SERVER_OPTIMIZERS)}")
        if not self.lr > 0:
            raise ValueError(f"server learning rate {self.lr} must be > 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(
                f"strategy.server-beta1 ({self.beta1}) and strategy.server-beta2 ({self.beta2}) must be in [0, 1)"
            )

    def apply(self, params: Params, gradient: Params, state: ServerOptimizerState) -> dict[str, np.ndarray]:
        state.step += 1
        updated = {}
        for name, value in params.items():
            g = np.asarray(gradient[name], dtype=np.float64)
            if self.name == "sgd":
                step = g
            elif self.name == "momentum":
                m = self.beta1 * state.first_moment.get(name, 0.0) + g
                state.first_moment[name] = m
                step = m
            else:
                m = self.beta1 * state.first_moment.get(name, 0.0) + (1 - self.beta1) * g
                v = self.beta2 * state.second_moment.get(name, 0.0) + (1 - self.beta2) * g * g
                state.first_moment[name], state.second_moment[name] = m, v
                m_hat = m / (1 - self.beta1**state.step)
                v_hat = v / (1 - self.beta2**state.step)
                step = m_hat / (np.sqrt(v_hat) + self.epsilon)
            updated[name] = (np.asarray(value, dtype=np.float64) - self.lr * step).astype(np.asarray(value).dtype)
        return updated


def fedasync_mix(params: Params, trained: Params, mixing: float) -> dict[str, np.ndarray]:
    """FedAsync: x <- (1 - a) x + a x_k, with a = alpha * s(tau) in [0, 1]."""
    if not 0.0 <= mixing <= 1.0:
        raise ValueError(f"mixing weight {mixing} must be in [0, 1]")
    return {
        name: (
            (1 - mixing) * np.asarray(value, dtype=np.float64) + mixing * np.asarray(trained[name], dtype=np.float64)
        ).astype(np.asarray(value).dtype)
        for name, value in params.items()
    }


# --- LoRA: averaging A and B separately is not averaging B @ A -------------------------------


def lora_pairs(params: Params) -> dict[str, tuple[str, str]]:
    """module prefix -> (name of its A, name of its B) for every LoRA module in `params`."""
    pairs = {}
    for name in params:
        if ".lora_A." in name:
            prefix = name.split(".lora_A.")[0]
            b_name = name.replace(".lora_A.", ".lora_B.")
            if b_name in params:
                pairs[prefix] = (name, b_name)
    return pairs


def products(params: Params) -> dict[str, np.ndarray]:
    """B @ A of every LoRA module: the update it adds to the frozen weight (up to alpha / r)."""
    return {
        prefix: np.asarray(params[b], np.float64) @ np.asarray(params[a], np.float64)
        for prefix, (a, b) in lora_pairs(params).items()
    }


def refactorise(product: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) of rank `rank` with B @ A the best rank-r approximation of `product` (truncated SVD),
    the singular values split evenly between the factors."""
    u, s, vt = np.linalg.svd(product, full_matrices=False)
    root = np.sqrt(s[:rank])
    return root[:, None] * vt[:rank], u[:, :rank] * root[None, :]


def svd_aggregate(params: Params, target_products: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An adapter whose modules' B @ A are the rank-r refactorisations of `target_products`;
    tensors that are not LoRA pairs are copied from `params`."""
    result = {name: np.asarray(value) for name, value in params.items()}
    for prefix, (a_name, b_name) in lora_pairs(params).items():
        rank = np.asarray(params[a_name]).shape[0]
        a, b = refactorise(target_products[prefix], rank)
        result[a_name] = a.astype(np.asarray(params[a_name]).dtype)
        result[b_name] = b.astype(np.asarray(params[b_name]).dtype)
    return result
