"""The aggregation maths, property-tested on random arrays (no Flower, no torch)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chemfl.server_app.aggregation import (
    ServerOptimizer,
    ServerOptimizerState,
    Staleness,
    fedasync_mix,
    products,
    refactorise,
    staleness_weight,
)
from chemfl.server_app.rules import Update
from tests.server_app.rule_defaults import fedasync, fedbuff

STALENESS = [
    Staleness("constant", 0.5, 4.0),
    Staleness("polynomial", 0.5, 4.0),
    Staleness("polynomial", 2.0, 4.0),
    Staleness("hinge", 1.0, 2.0),
    Staleness("sqrt", 0.5, 4.0),
]


def adapter(rng, rank=2, d_in=5, d_out=4):
    return {
        "m.lora_A.weight": rng.normal(size=(rank, d_in)).astype(np.float32),
        "m.lora_B.weight": rng.normal(size=(d_out, rank)).astype(np.float32),
    }


def update(params, version_sent=0, node=1):
    return Update(node_id=node, version_sent=version_sent, params=params, num_examples=10, train_loss=1.0)


@given(st.integers(0, 10_000), st.sampled_from(STALENESS))
def test_weights_are_in_unit_interval_and_never_increase_with_staleness(tau, staleness):
    assert 0.0 < staleness(tau) <= 1.0
    assert staleness(tau + 1) <= staleness(tau)
    assert staleness(0) == 1.0


def test_named_staleness_values():
    assert Staleness("sqrt", 0.5, 4.0)(3) == pytest.approx(0.5)
    assert Staleness("polynomial", 1.0, 4.0)(3) == pytest.approx(0.25)
    assert Staleness("hinge", 0.5, 2)(2) == 1.0
    assert Staleness("hinge", 0.5, 2)(6) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="future"):
        Staleness("sqrt", 0.5, 4.0)(-1)
    with pytest.raises(ValueError, match="unknown staleness"):
        Staleness("exp", 0.5, 4.0)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_fedbuff_with_zero_staleness_and_k_clients_is_fedavg_on_deltas(n_clients, seed):
    rng = np.random.default_rng(seed)
    current = adapter(rng)
    trained = [adapter(rng) for _ in range(n_clients)]
    strategy = fedbuff(buffer_size=n_clients, staleness=Staleness("sqrt", 0.5, 4.0))
    published = None
    for i, params in enumerate(trained):
        verdict, published = strategy.submit(current, 0, current, update(params, node=i))
        assert verdict.accepted and verdict.staleness == 0 and verdict.weight == 1.0
        assert (published is None) == (i < n_clients - 1)
    for name in current:
        fedavg = current[name] - np.mean([current[name] - t[name] for t in trained], axis=0)
        np.testing.assert_allclose(published[name], fedavg, rtol=1e-5, atol=1e-6)
    assert strategy.buffer == []


def test_fedbuff_publishes_after_exactly_k_and_weights_by_staleness():
    rng = np.random.default_rng(0)
    current, sent_old = adapter(rng), adapter(rng)
    a, b, c = adapter(rng), adapter(rng), adapter(rng)
    strategy = fedbuff(buffer_size=3, staleness=Staleness("sqrt", 0.5, 4.0))
    assert strategy.submit(current, 3, sent_old, update(a, version_sent=0))[1] is None  # tau 3, weight 1/2
    assert strategy.submit(current, 3, current, update(b, version_sent=3))[1] is None
    verdict, published = strategy.submit(current, 3, current, update(c, version_sent=3))
    assert len(strategy.buffer) == 0
    name = "m.lora_B.weight"
    expected = (
        current[name] - (0.5 * (sent_old[name] - a[name]) + (current[name] - b[name]) + (current[name] - c[name])) / 3
    )
    np.testing.assert_allclose(published[name], expected, rtol=1e-5, atol=1e-6)


def test_an_update_older_than_the_cutoff_changes_nothing():
    rng = np.random.default_rng(1)
    current = adapter(rng)
    for strategy in (fedbuff(buffer_size=1, max_staleness=2), fedasync(alpha=0.9, max_staleness=2)):
        verdict, published = strategy.submit(current, 10, current, update(adapter(rng), version_sent=7))
        assert not verdict.accepted and verdict.reason == "stale" and verdict.weight == 0.0
        assert published is None
        assert getattr(strategy, "buffer", []) == []
    assert staleness_weight(3, Staleness("constant", 0.5, 4.0), 2) == 0.0
    assert staleness_weight(2, Staleness("constant", 0.5, 4.0), 2) == 1.0


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.05, 1.0), st.integers(0, 20))
def test_fedasync_mixes_with_alpha_times_staleness(seed, alpha, tau):
    rng = np.random.default_rng(seed)
    current, trained = adapter(rng), adapter(rng)
    strategy = fedasync(alpha=alpha, staleness=Staleness("polynomial", 0.5, 4.0))
    verdict, published = strategy.submit(current, tau, current, update(trained, version_sent=0))
    mixing = alpha * (tau + 1) ** -0.5
    assert verdict.weight == pytest.approx((tau + 1) ** -0.5)
    for name in current:
        np.testing.assert_allclose(
            published[name], (1 - mixing) * current[name] + mixing * trained[name], rtol=1e-5, atol=1e-6
        )
    np.testing.assert_allclose(fedasync_mix(current, trained, 0.0)["m.lora_A.weight"], current["m.lora_A.weight"])


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 5), st.integers(0, 2**31 - 1))
def test_ffa_path_equals_averaging_the_full_updates(n_clients, seed):
    """With A frozen and shared, FedBuff on B alone gives exactly the average of the products B A."""
    rng = np.random.default_rng(seed)
    frozen_a = rng.normal(size=(2, 5))
    current_b = {"m.lora_B.weight": rng.normal(size=(4, 2))}
    trained_b = [{"m.lora_B.weight": rng.normal(size=(4, 2))} for _ in range(n_clients)]
    strategy = fedbuff(buffer_size=n_clients, staleness=Staleness("constant", 0.5, 4.0))
    for params in trained_b:
        _, published = strategy.submit(current_b, 0, current_b, update(params))
    aggregated_product = published["m.lora_B.weight"] @ frozen_a
    mean_product = np.mean([p["m.lora_B.weight"] @ frozen_a for p in trained_b], axis=0)
    np.testing.assert_allclose(aggregated_product, mean_product, rtol=1e-9, atol=1e-9)


def test_naive_a_b_averaging_is_not_the_average_update_but_svd_is():
    rng = np.random.default_rng(3)
    current = adapter(rng, rank=2, d_in=6, d_out=6)
    trained = [adapter(rng, rank=2, d_in=6, d_out=6) for _ in range(2)]
    mean_product = np.mean([products(t)["m"] for t in trained], axis=0)  # rank <= 4
    results = {}
    for mode, _rank_needed in (("naive", 2), ("svd", 2)):
        strategy = fedbuff(buffer_size=2, staleness=Staleness("constant", 0.5, 4.0), lora_aggregation=mode)
        for params in trained:
            _, published = strategy.submit(current, 0, current, update(params))
        results[mode] = products(published)["m"]
    naive_error = np.linalg.norm(results["naive"] - mean_product)
    svd_error = np.linalg.norm(results["svd"] - mean_product)
    best_rank2 = np.linalg.svd(mean_product, compute_uv=False)[2:]  # what rank 2 must lose
    assert svd_error == pytest.approx(np.sqrt(np.sum(best_rank2**2)), rel=1e-6)
    assert svd_error < naive_error


@given(st.integers(0, 2**31 - 1))
def test_refactorise_reproduces_a_product_of_its_rank(seed):
    rng = np.random.default_rng(seed)
    product = rng.normal(size=(6, 3)) @ rng.normal(size=(3, 7))
    a, b = refactorise(product, 3)
    assert a.shape == (3, 7) and b.shape == (6, 3)
    np.testing.assert_allclose(b @ a, product, rtol=1e-7, atol=1e-8)


def test_server_optimizers():
    params, gradient = {"w": np.array([1.0, 2.0])}, {"w": np.array([0.5, -1.0])}
    np.testing.assert_allclose(
        ServerOptimizer("sgd", 0.1, 0.9, 0.99).apply(params, gradient, ServerOptimizerState())["w"], [0.95, 2.1]
    )
    state = ServerOptimizerState()
    momentum = ServerOptimizer("momentum", 1.0, 0.5, 0.99)
    first = momentum.apply(params, gradient, state)
    second = momentum.apply(first, gradient, state)  # m = 0.5 g + g = 1.5 g
    np.testing.assert_allclose(second["w"], first["w"] - 1.5 * gradient["w"])
    adam_state = ServerOptimizerState()
    adam = ServerOptimizer("adam", 0.01, 0.9, 0.99)
    stepped = adam.apply(params, gradient, adam_state)
    # First bias-corrected Adam step moves each coordinate by lr * sign(g).
    np.testing.assert_allclose(stepped["w"], params["w"] - 0.01 * np.sign(gradient["w"]), rtol=1e-6)
    with pytest.raises(ValueError):
        ServerOptimizer("lion", 1.0, 0.9, 0.99)
