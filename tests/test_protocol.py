"""The one contract between the apps, the emulator and the report: round trips, and the wire
names both sides agree on."""

from __future__ import annotations

import pytest

from chemfl import protocol
from chemfl.protocol import JobLine, NodeInfo, RoundLine, Task, TrainReport, UpdateLine, VersionLine


def test_task_round_trips_and_leaves_out_what_is_unset():
    task = Task(server_round=3, task_id=17, local_steps=5, lora_a_digest="abc")
    config = task.to_config()
    assert config == {"server-round": 3, "task-id": 17, "local-steps": 5, "lora-a-digest": "abc"}
    assert Task.from_config(config) == task
    assert Task(lora_a_digest=None).to_config() == {}  # Flower's records hold no None
    assert Task.from_config({"server-round": 2}).batch_order_key == 2
    assert Task.from_config({"server-round": 2, "task-id": 9}).batch_order_key == 9


def test_task_local_steps_is_the_planned_number_else_the_run_default():
    assert protocol.task_local_steps(None, 8) == 8
    assert protocol.task_local_steps(3, 8) == 3
    assert protocol.task_local_steps(0, 8) == 1  # a planned task always trains


def test_train_report_needs_every_scalar():
    report = TrainReport(num_examples=10, train_loss=0.5, steps=2, seconds=1.5, tokens_per_second=99.0)
    assert TrainReport.from_metrics(report.to_metrics()) == report
    assert report.to_metrics()[protocol.NUM_EXAMPLES] == 10
    with pytest.raises(KeyError, match="train-loss"):
        TrainReport.from_metrics({"num-examples": 1, "steps": 1, "seconds": 1.0, "tokens-per-second": 1.0})


def test_node_info_walltime_is_optional_but_the_facility_is_not():
    assert NodeInfo.from_record({"facility": "polaris"}) == NodeInfo("polaris", None)
    assert NodeInfo("aurora", 120.0).to_record() == {"facility": "aurora", "walltime-remaining": 120.0}
    with pytest.raises(KeyError, match="facility"):
        NodeInfo.from_record({"walltime-remaining": 3.0})


@pytest.mark.parametrize(
    "line",
    [
        protocol.RunLine("fedbuff", "calm", 0, True, {"polaris": {"nodes": 1, "supernodes": 1}}),
        RoundLine(round=1, wall_time=2.0, facilities=["aurora"], train={"train-loss": 1.0}, eval={"loss": 2.0}),
        VersionLine(4, 10.0, {"accepted": 3}, {"polaris": 3}, 0.1, 2.0, 1.7),
        VersionLine(5, 12.0, eval_loss=1.6, eval={"loss": 1.6, "tasks": {"name_conversion-i2s": {"exact_match": 0.5}}}),
        protocol.EvaluationLine(1, 30.0, 41.0, "server", 1.2, {"loss": 1.2}, "adapter-polaris"),
        protocol.TrainingLine("adapter-polaris", ["polaris"], 1352, 48, 192, 1.1, 150.0, 151.0),
        UpdateLine(1, "polaris", 0, 2, 2, 0.5, True, "", 9.0, 1.2, 3.0, 1.0, 8, None),
        protocol.LostLine(2, None, 1, "walltime: job ended", 4.0, 1.0, 8),
        JobLine("frontier", 3, "running", 7200.0),
    ],
)
def test_every_metrics_line_round_trips_through_json(line):
    data = protocol.to_json(line)
    assert data["event"] == type(line).EVENT
    assert protocol.from_json(data) == line


def test_reading_old_and_foreign_lines():
    assert protocol.from_json({"round": 2, "wall_time": 1.0}) == RoundLine(round=2, wall_time=1.0)  # before `event`
    assert protocol.from_json({"event": "something-newer", "x": 1}) is None  # skipped by readers
    assert protocol.from_json({"event": "version", "version": 1, "wall_time": 2.0, "added_later": 5}).version == 1
    with pytest.raises(TypeError):
        protocol.from_json({"event": "update", "node": 1})  # required fields missing
    with pytest.raises(ValueError, match="job state 'paused'"):
        protocol.from_json({"event": "job", "facility": "x", "job": 0, "state": "paused", "time": 0.0})
