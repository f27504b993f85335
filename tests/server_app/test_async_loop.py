"""The asynchronous run loop against a scripted Grid."""

from collections import Counter

import numpy as np
import pytest

from chemfl.server_app.aggregation import ServerOptimizer, Staleness
from chemfl.server_app.async_loop import AsyncRun
from chemfl.server_app.checkpoint import AsyncState, Checkpointer
from tests.server_app.fake_grid import FakeGrid
from tests.server_app.rule_defaults import fedasync, fedbuff, settings

pytestmark = pytest.mark.usefixtures("server_task_identity")


def initial_params():
    rng = np.random.default_rng(0)
    return {
        "m.lora_A.weight": rng.normal(size=(2, 3)).astype(np.float32),
        "m.lora_B.weight": np.zeros((4, 2), dtype=np.float32),
    }


def make_run(grid, strategy, versions=6, records=None, evaluate=None, checkpointer=None, state=None, **setting_changes):
    lines = records if records is not None else []
    return AsyncRun(
        grid=grid,
        strategy=strategy,
        state=state or AsyncState(params=initial_params()),
        settings=settings(**{"num_versions": versions, "eval_every": 0, "poll_seconds": 1.0, **setting_changes}),
        evaluate=evaluate or (lambda version, params: None),
        record=lines.append,
        checkpointer=checkpointer,
        clock=grid.clock,
        sleep=grid.advance,
    ), lines


def updates(lines):
    return [line for line in lines if line["event"] == "update"]


def test_fast_nodes_contribute_more_and_each_version_takes_exactly_k_updates():
    grid = FakeGrid(durations={1: 1.0, 2: 1.0, 3: 4.0})
    run, lines = make_run(grid, fedbuff(buffer_size=3), versions=8)
    run.run()
    accepted = [line for line in updates(lines) if line["accepted"]]
    assert run.state.version == 8 and len(accepted) == 24  # exactly K = 3 per version
    per_node = Counter(line["node"] for line in accepted)
    assert per_node[1] > per_node[3] and per_node[2] > per_node[3]
    assert all(line["staleness"] >= 0 for line in accepted)
    assert any(line["staleness"] > 0 for line in accepted if line["node"] == 3)  # the slow node lags
    assert 0 < min(line["weight"] for line in accepted) <= max(line["weight"] for line in accepted) <= 1


def test_staleness_is_versions_published_since_dispatch():
    grid = FakeGrid(durations={1: 1.0, 2: 10.0})
    run, lines = make_run(grid, fedasync(alpha=0.5, staleness=Staleness("sqrt", 0.5, 4.0)), versions=12)
    run.run()
    slow = [line for line in updates(lines) if line["node"] == 2]
    assert slow and slow[0]["version_sent"] == 0 and slow[0]["staleness"] == slow[0]["version"] == 9
    assert slow[0]["weight"] == pytest.approx(1 / np.sqrt(10))


def test_vanishing_and_joining_nodes_do_not_stall_the_run():
    grid = FakeGrid(
        durations={1: 1.0, 2: 1.0, 3: 1.0},
        online={1, 2},
        events=[(2.5, "leave", 2), (3.5, "join", 3), (6.5, "join", 2)],
    )
    run, lines = make_run(grid, fedbuff(buffer_size=2), versions=10)
    run.run()
    lost = [line for line in lines if line["event"] == "lost"]
    assert [line["node"] for line in lost] == [2]
    accepted_nodes = [line["node"] for line in updates(lines) if line["accepted"]]
    assert 3 in accepted_nodes  # picked up after joining
    assert 2 in accepted_nodes[accepted_nodes.index(3) :]  # used again after coming back
    assert run.state.version == 10


def test_error_replies_lose_the_work_and_the_node_is_used_again():
    grid = FakeGrid(durations={1: 1.0, 2: 1.5}, reply_kinds={2: ["error"]})
    run, lines = make_run(grid, fedbuff(buffer_size=2), versions=4)
    run.run()
    lost = [line for line in lines if line["event"] == "lost"]
    assert len(lost) == 1 and "error 2" in lost[0]["reason"]
    assert any(line["node"] == 2 and line["accepted"] for line in updates(lines))
    assert run.state.counters["lost"] == 1


@pytest.mark.parametrize(
    "kind, reason",
    [("nan", "non-finite"), ("keys", "keys differ"), ("shape", "shape"), ("dtype", "dtype"), ("big", "update norm")],
)
def test_malformed_and_nan_updates_are_rejected_and_never_aggregated(kind, reason):
    def run_with(kinds):
        grid = FakeGrid(durations={1: 1.0, 2: 1.3}, reply_kinds={2: kinds})
        strategy = fedbuff(buffer_size=1)
        run, lines = make_run(grid, strategy, versions=3, max_update_norm=100.0)
        run.run()
        return run, lines

    run, lines = run_with([kind])
    rejected = [line for line in updates(lines) if not line["accepted"]]
    assert len(rejected) == 1 and rejected[0]["node"] == 2 and reason in rejected[0]["reason"]
    assert rejected[0]["weight"] == 0.0
    assert run.state.counters["rejected"] == 1
    assert all(np.all(np.isfinite(v)) and np.abs(v).max() < 100 for v in run.state.params.values())
    # The rejected reply changed nothing: the versions come from the accepted updates alone.
    accepted = [line for line in updates(lines) if line["accepted"]]
    assert len(accepted) == run.state.version == 3


def test_stops_on_wall_clock_budget_and_on_target_loss():
    grid = FakeGrid(durations={1: 1.0})
    run, _ = make_run(grid, fedbuff(buffer_size=1), versions=1000, max_seconds=5.5)
    run.run()
    assert run.state.version == 5
    losses = iter([3.0, 2.0, 1.0, 0.5, 0.1])
    grid = FakeGrid(durations={1: 1.0})
    run, _ = make_run(
        grid,
        fedbuff(buffer_size=1),
        target_loss=0.9,
        eval_every=1,
        evaluate=lambda version, params: next(losses),
    )
    run.run()
    assert run.state.version == 3 and run.last_loss == 0.5  # evaluated at versions 0..3


def test_evaluates_every_n_versions_and_at_the_end():
    evaluated = []
    grid = FakeGrid(durations={1: 1.0, 2: 1.0})
    run, _ = make_run(
        grid,
        fedbuff(buffer_size=1),
        versions=7,
        eval_every=3,
        poll_seconds=0.2,
        evaluate=lambda version, params: evaluated.append(version) or 1.0,
    )
    run.run()
    assert evaluated == [0, 3, 6, 7]


def test_concurrency_caps_messages_in_flight():
    grid = FakeGrid(durations={1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0})
    run, _ = make_run(grid, fedasync(), versions=6, concurrency=2, poll_seconds=0.2)
    in_flight_sizes = []
    original = grid.push_messages

    def watching(messages):
        ids = original(messages)
        in_flight_sizes.append(len(grid._queue))
        return ids

    grid.push_messages = watching
    run.run()
    assert max(in_flight_sizes) == 2


def test_resume_gives_the_uninterrupted_result(tmp_path):
    """Stop the server mid-run (buffer half full), restart from the checkpoint: the final version
    count and adapter equal those of an uninterrupted run with the same arrival order."""

    def strategy():
        return fedbuff(buffer_size=3, staleness=Staleness("sqrt", 0.5, 4.0))

    durations = {1: 1.0}  # one node: the arrival order is the same in both runs
    uninterrupted, _ = make_run(
        FakeGrid(durations=durations), strategy(), versions=5, checkpointer=Checkpointer(tmp_path / "a")
    )
    expected = uninterrupted.run()

    crashing_grid = FakeGrid(durations=durations, fail_after_pulls=8)  # 2 versions + 2 buffered
    first, _ = make_run(crashing_grid, strategy(), versions=5, checkpointer=Checkpointer(tmp_path / "b"))
    with pytest.raises(KeyboardInterrupt):
        first.run()
    assert first.state.version == 2 and len(first.strategy.buffer) == 2

    resumed_strategy = strategy()
    checkpointer = Checkpointer(tmp_path / "b")
    state = checkpointer.load(resumed_strategy)
    # The 9th task was dispatched but never checkpointed: the resumed run sends it again.
    assert state.version == 2 and len(resumed_strategy.buffer) == 2 and state.task_counter == 8
    grid = FakeGrid(durations=durations)
    second, lines = make_run(grid, resumed_strategy, versions=5, checkpointer=checkpointer, state=state)
    final = second.run()
    assert second.state.version == uninterrupted.state.version == 5
    for name in expected:
        np.testing.assert_array_equal(final[name], expected[name])
    # No buffered update counted twice: 15 accepted updates in all, as uninterrupted.
    assert second.state.counters["accepted"] == uninterrupted.state.counters["accepted"] == 15


def test_checkpoint_keeps_only_what_state_json_names(tmp_path):
    grid = FakeGrid(durations={1: 1.0, 2: 1.5})
    run, _ = make_run(
        grid,
        fedbuff(
            buffer_size=2,
            optimizer=ServerOptimizer("adam", 0.1, 0.9, 0.99),
        ),
        versions=3,
        checkpointer=Checkpointer(tmp_path),
    )
    run.run()
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names[-1] == "state.json" and any(n.startswith("global-v3") for n in names)
    assert not any(n.startswith(".") for n in names)
    restored = fedbuff(buffer_size=2)
    state = Checkpointer(tmp_path).load(restored)
    assert state.version == 3 and restored.optimizer_state.step == 3
    assert set(restored.optimizer_state.second_moment) == set(initial_params())
