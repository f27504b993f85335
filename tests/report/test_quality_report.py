"""`chemfl report` comparing trained models on the test set: FedAvg's round lines, FedBuff's version
lines and a local baseline's per-facility evaluations read into one per-task table and bar chart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chemfl import protocol
from chemfl.config import resolve
from chemfl.report.runs import model_results, read_run, read_runs, run_labels
from chemfl.server_app.evaluation import CentralEvaluator
from tests.report.test_report import assert_figure, make_report

TASKS = ("name_conversion-i2s", "property_prediction-ro3")
CONFIG = {"data.facilities": "polaris,aurora", "train.batch-size": 4, "train.grad-accum": 1}


def result(loss: float, i2s: float, ro3: float) -> dict:
    """chemfl.llm.evaluation.evaluate's result, cut to what the report reads."""
    tasks = {TASKS[0]: {"n": 6, "exact_match": i2s}, TASKS[1]: {"n": 6, "exact_match": ro3}}
    return {"loss": loss, "n_loss": 32, "tasks": tasks, "overall": {"exact_match": (i2s + ro3) / 2}}


def write_run(folder: Path, strategy: str, lines: list) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**CONFIG, "strategy.name": strategy}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(protocol.to_json(line)) + "\n" for line in lines))
    return folder


@pytest.fixture
def fedavg(tmp_path) -> Path:
    both, train = ["aurora", "polaris"], {"steps": 8.0, "train-loss": 1.0}
    return write_run(
        tmp_path / "fedavg",
        "fedavg",
        [
            protocol.RoundLine(round=0, wall_time=5.0, eval=result(2.8, 0.0, 0.5)),
            protocol.RoundLine(round=1, wall_time=60.0, facilities=both, train=train),
            protocol.RoundLine(round=2, wall_time=120.0, facilities=both, train=train, eval=result(0.9, 0.5, 0.83)),
        ],
    )


@pytest.fixture
def local(tmp_path) -> Path:
    lines: list = [protocol.RunLine(strategy="local")]
    for number, (facility, scores) in enumerate((("polaris", (1.4, 0.33, 0.5)), ("aurora", (1.6, 0.0, 0.67)))):
        adapter = f"adapter-{facility}"
        lines.append(protocol.TrainingLine(adapter, [facility], 100, 32, 128, 1.1, 50.0, 50.0 + 60 * number))
        lines.append(
            protocol.EvaluationLine(
                1, 50.0 + 60 * number, 55.0 + 60 * number, "server", scores[0], result(*scores), adapter
            )
        )
    return write_run(tmp_path / "local", "local", lines)


@pytest.fixture
def fedbuff(tmp_path) -> Path:
    lines: list = [protocol.VersionLine(0, 5.0, eval_loss=2.8, eval=result(2.8, 0.0, 0.5))]
    for arrival, facility in enumerate(("polaris", "aurora", "polaris", "aurora"), start=1):
        lines.append(protocol.UpdateLine(1, facility, 0, 0, 0, 1.0, True, "", 30.0 * arrival, 1.0, 25.0, steps=8))
    lines.append(protocol.VersionLine(2, 120.0, eval_loss=1.0, eval=result(1.0, 0.33, 0.83)))
    return write_run(tmp_path / "fedbuff", "fedbuff", lines)


def test_each_trained_model_at_its_last_evaluation_with_the_compute_it_had(fedavg, local, fedbuff):
    runs = read_runs([fedavg, local, fedbuff])
    models = model_results(runs, run_labels(runs))
    assert [model.label for model in models] == [
        "base model",
        "fedavg",
        "local: polaris",
        "local: aurora",
        "fedbuff",
    ]
    base, fedavg_model, polaris, aurora, fedbuff_model = models
    assert (base.scores.loss, base.steps, base.scores.version) == (2.8, 0, 0)  # fedavg's round 0
    # Equal compute: 2 rounds x 2 facilities x 8 steps = 4 FedBuff updates x 8 = each local model's 32.
    assert [(model.steps, model.examples) for model in models[1:]] == [(32, 128)] * 4
    assert fedavg_model.scores.exact_match == {TASKS[0]: 0.5, TASKS[1]: 0.83}
    assert polaris.facilities == ["polaris"] and polaris.scores.loss == 1.4
    assert aurora.scores.macro_exact_match == pytest.approx(0.335)
    assert fedbuff_model.scores.version == 2 and fedbuff_model.scores.loss == 1.0
    # A local baseline has no global adapter: its facilities' evaluations are not one loss curve.
    assert read_run(local).evaluations == []


def test_report_draws_the_per_task_bar_chart_and_table(fedavg, local, tmp_path):
    out = tmp_path / "report"
    assert make_report([fedavg, local], out) == 0
    assert sorted(path.name for path in out.iterdir()) == ["loss.png", "quality.png", "summary.md", "updates.png"]
    assert_figure(out / "quality.png")
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert f"| model | steps | examples | test loss | {TASKS[0]} | {TASKS[1]} | macro exact match |" in summary
    assert "| base model | 0 | 0 | 2.800 | 0.00 | 0.50 | 0.250 |" in summary
    assert "| fedavg | 32 | 128 | 0.900 | 0.50 | 0.83 | 0.665 |" in summary
    assert "| local: aurora | 32 | 128 | 1.600 | 0.00 | 0.67 | 0.335 |" in summary
    assert "![Test-set exact match per task, one bar per trained model](quality.png)" in summary


def test_asynchronous_version_lines_carry_the_servers_per_task_result():
    evaluator = CentralEvaluator(None, None, None, resolve({}), None, 4, {})
    evaluator.history.append({"version": 3, "eval": result(1.0, 0.5, 0.5)})
    evaluated = protocol.to_json(protocol.VersionLine(3, 9.0, eval_loss=1.0))
    assert evaluator.with_result(evaluated)["eval"] == result(1.0, 0.5, 0.5)
    for line in (
        protocol.VersionLine(2, 8.0, eval_loss=1.2),  # an earlier version's evaluation
        protocol.VersionLine(3, 9.0),  # evaluated elsewhere (eval.at): no loss here yet
        protocol.UpdateLine(1, "polaris", 2, 3, 1, 0.7, True, "", 9.0),
    ):
        assert evaluator.with_result(protocol.to_json(line)) == protocol.to_json(line)
