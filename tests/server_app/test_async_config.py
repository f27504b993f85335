"""Asynchronous settings are checked before any work starts; resume continues a run folder."""

import pytest

from chemfl.config import resolve
from chemfl.emulation import parse_slowdown
from chemfl.errors import ChemFLError
from chemfl.server_app.checkpoint import Checkpointer
from chemfl.server_app.outputs import RunOutputs
from chemfl.server_app.rules import FedAsyncRule, FedBuffRule
from chemfl.server_app.strategies import FedAsync, FedBuff, make_strategy
from chemfl.server_app.strategy_spec import StrategySpec
from tests.server_app.rule_defaults import fedbuff as fedbuff_rule


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"strategy.name": "fedbuff", "strategy.buffer-size": 0}, "buffer size K = 0"),
        ({"strategy.name": "fedbuff", "strategy.staleness": "exp"}, "unknown staleness function 'exp'"),
        ({"strategy.name": "fedbuff", "strategy.server-optimizer": "lion"}, "unknown server optimizer 'lion'"),
        ({"strategy.name": "fedbuff", "strategy.server-lr": 0.0}, "server learning rate"),
        ({"strategy.name": "fedbuff", "lora.aggregation": "mean"}, "lora.aggregation = 'mean'"),
        ({"strategy.name": "fedbuff", "lora.aggregation": "svd", "lora.freeze-a": True}, "already exact"),
        ({"strategy.name": "fedasync", "strategy.fedasync-alpha": 1.5}, "alpha = 1.5"),
    ],
)
def test_bad_strategy_settings_are_clear_errors(overrides, message):
    with pytest.raises(ChemFLError, match=message):
        StrategySpec.from_config(resolve(overrides))


def make(config):
    return make_strategy(StrategySpec.from_config(config), lambda *_: None)


def test_strategy_settings_reach_the_strategy():
    fedbuff = make(
        resolve(
            {
                "strategy.name": "fedbuff",
                "strategy.buffer-size": 5,
                "strategy.max-staleness": 7,
                "strategy.staleness": "hinge",
                "strategy.server-optimizer": "adam",
                "lora.aggregation": "svd",
            }
        )
    )
    assert isinstance(fedbuff, FedBuff) and isinstance(fedbuff.rule, FedBuffRule)
    rule = fedbuff.rule
    assert rule.buffer_size == 5 and rule.max_staleness == 7
    assert rule.staleness.name == "hinge" and rule.optimizer.name == "adam" and rule.lora_aggregation == "svd"
    fedasync = make(resolve({"strategy.name": "fedasync", "strategy.fedasync-alpha": 0.9}))
    assert isinstance(fedasync, FedAsync) and isinstance(fedasync.rule, FedAsyncRule)
    assert fedasync.rule.alpha == 0.9 and fedasync.rule.max_staleness is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"strategy.num-versions": 0}, "num-versions = 0"),
        ({"strategy.concurrency": -1}, "concurrency = -1"),
        ({"strategy.message-ttl": 0.0}, "message-ttl"),
    ],
)
def test_bad_run_loop_settings_are_clear_errors(overrides, message):
    with pytest.raises(ChemFLError, match=message):
        StrategySpec.from_config(resolve(overrides))


def test_slowdown_setting():
    assert parse_slowdown("polaris=4, aurora=1.5") == {"polaris": 4.0, "aurora": 1.5}
    assert parse_slowdown("") == {}
    for bad in ("polaris", "polaris=fast", "polaris=0.5", "=3"):
        with pytest.raises(ChemFLError, match="emulation.slowdown"):
            parse_slowdown(bad)


def test_resume_continues_in_the_same_folder_and_a_new_run_moves_the_old_one_aside(tmp_path):
    first = RunOutputs(tmp_path, "run")
    first.append_metrics({"event": "version", "version": 1})
    resumed = RunOutputs(tmp_path, "run", resume=first.dir)
    resumed.append_metrics({"event": "version", "version": 2})
    assert resumed.dir == first.dir and len(first.metrics_path.read_text().splitlines()) == 2
    fresh = RunOutputs(tmp_path, "run")
    assert fresh.dir == first.dir and not fresh.metrics_path.exists()
    assert len((tmp_path / "run.1" / "metrics.jsonl").read_text().splitlines()) == 2
    with pytest.raises(ChemFLError, match="no such run folder"):
        RunOutputs(tmp_path, "run", resume=tmp_path / "missing")
    with pytest.raises(ChemFLError, match="nothing to resume"):
        Checkpointer(tmp_path / "run" / "checkpoint").load(fedbuff_rule())
