"""`chemfl report` on small synthetic run folders: exact node-hour accounting, tallies, time to
target, the files written, plain simulations without job lines, and the error cases.

The emulated campaign (virtual seconds, hand-checked):
- fedbuff, polaris (2 nodes per job, 1 SuperNode): job 1 runs 600-4200 s, job 2 runs 4200-6300 s:
  spent (3600 + 2100) x 2 / 3600 = 19/6 nh; busy (1800 + 900) x 2 = 1.5 nh; lost 1800 x 2 = 1.0 nh
  (walltime end of job 1); idle 2/3 nh (job 2 after its update); wasted 10/19.
- fedbuff, aurora (1 node per job, 2 SuperNodes): job 1 runs 1800-5400 s = 1.0 nh; busy
  (1800 + 2880 + 720) x 0.5 = 0.75 nh; idle 0.25 nh; job 2 queued at 5000 never runs.
- fedavg, frontier (1 node, 1 SuperNode): job 1 runs 0-7200 s, job 2 7200-9000 s: spent 2.5 nh;
  busy 1.0 nh; lost 1.0 nh (walltime); idle 0.5 nh; wasted 0.6.
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

import matplotlib.image
import pytest

from chemfl.errors import ChemFLError
from chemfl.report import cli as report_cli
from chemfl.report.plots import run_styles
from chemfl.report.runs import Evaluation, read_run, read_runs, run_labels, summarize, time_to_target

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NODE_IDS = {"polaris": 11, "aurora": 12, "frontier": 13}


def write_run(folder: Path, lines: list[dict], config: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return folder


def job(facility: str, number: int, state: str, time: float, nodes: int) -> dict:
    return {"event": "job", "facility": facility, "job": number, "state": state, "time": time, "nodes": nodes}


def update(
    facility: str, dispatch: float, arrival: float, staleness: int, accepted: bool = True, reason: str = ""
) -> dict:
    return {
        "event": "update",
        "node": NODE_IDS[facility],
        "facility": facility,
        "version_sent": 0,
        "version": staleness,
        "staleness": staleness,
        "weight": 1.0 if accepted else 0.0,
        "accepted": accepted,
        "reason": reason,
        "dispatch_time": dispatch,
        "arrival_time": arrival,
        "train_loss": 1.0,
        "train_seconds": arrival - dispatch,
        "steps": 8,
    }


def lost(facility: str, dispatch: float, time: float, reason: str) -> dict:
    return {
        "event": "lost",
        "node": NODE_IDS[facility],
        "facility": facility,
        "version_sent": 0,
        "reason": reason,
        "dispatch_time": dispatch,
        "time": time,
    }


def version(number: int, time: float, loss: float | None = None) -> dict:
    line = {"event": "version", "version": number, "wall_time": time, "counters": {}, "updates_by_facility": {}}
    if loss is not None:
        line["eval_loss"] = loss
    return line


@pytest.fixture
def fedbuff_campaign(tmp_path: Path) -> Path:
    return write_run(
        tmp_path / "campaign-fedbuff",
        [
            {
                "event": "run",
                "strategy": "fedbuff",
                "campaign": "two-facilities",
                "seed": 0,
                "virtual_time": True,
                "facilities": {"polaris": {"nodes": 2, "supernodes": 1}, "aurora": {"nodes": 1, "supernodes": 2}},
            },
            job("polaris", 1, "queued", 0, 2),
            job("aurora", 1, "queued", 0, 1),
            job("polaris", 1, "running", 600, 2),
            job("aurora", 1, "running", 1800, 1),
            update("polaris", 600, 2400, 0),
            version(1, 2400, 2.0),
            job("polaris", 2, "queued", 3000, 2),
            update("aurora", 1800, 3600, 1),
            version(2, 3600),
            lost("polaris", 2400, 4200, "walltime end of job 1"),
            job("polaris", 1, "ended", 4200, 2),
            job("polaris", 2, "running", 4200, 2),
            update("aurora", 3600, 4320, 0, accepted=False, reason="rejected: lora_B: non-finite values"),
            update("aurora", 1800, 4680, 4, accepted=False, reason="stale"),
            job("aurora", 2, "queued", 5000, 1),
            update("polaris", 4200, 5100, 2),
            version(3, 5100, 0.9),
            {"event": "calibration", "version": 3, "loss": 0.9},  # an event kind the report does not know
            job("aurora", 1, "ended", 5400, 1),
            job("polaris", 2, "ended", 6300, 2),
            job("aurora", 2, "ended", 6300, 1),
        ],
        config={"strategy.name": "ignored: the run line wins", "run-name": "campaign-fedbuff"},
    )


@pytest.fixture
def fedavg_campaign(tmp_path: Path) -> Path:
    return write_run(
        tmp_path / "campaign-fedavg",
        [
            {
                "event": "run",
                "strategy": "fedavg",
                "campaign": "two-facilities",
                "seed": 0,
                "virtual_time": True,
                "facilities": {"frontier": {"nodes": 1, "supernodes": 1}},
            },
            job("frontier", 1, "queued", 0, 1),
            job("frontier", 1, "running", 0, 1),
            update("frontier", 0, 3600, 0),
            version(1, 3600, 1.5),
            job("frontier", 2, "queued", 7000, 1),
            lost("frontier", 3600, 7200, "walltime end of job 1"),
            job("frontier", 1, "ended", 7200, 1),
            job("frontier", 2, "running", 7200, 1),
            job("frontier", 2, "ended", 9000, 1),
        ],
    )


def bench_fedavg_lines() -> list[dict]:
    """Synchronous FedAvg in the structure of outputs/bench-fedavg/metrics.jsonl (no job lines)."""
    everyone = ["aurora", "polaris"]
    rounds = [{"event": "round", "round": 0, "wall_time": 12.6, "eval": {"loss": 2.78, "n_loss": 48, "tasks": {}}}]
    for number, (time, loss) in enumerate([(341.9, 1.23), (611.1, 0.93), (851.4, 0.83)], start=1):
        rounds.append(
            {
                "bytes_received": 78469360,
                "bytes_sent": 78469360,
                "event": "round",
                "round": number,
                "eval": {"loss": loss, "n_loss": 48, "overall": {}, "seconds": 9.4, "tasks": {}},
                "facilities": everyone,
                "failed_replies": 0,
                "node_train_seconds": 270.7,
                "round_seconds": 259.6,
                "server_seconds": 0.15,
                "wall_time": time,
                "train": {"seconds": 67.7, "steps": 8.0, "train-loss": 1.2},
            }
        )
    return rounds


@pytest.fixture
def plain_fedavg(tmp_path: Path) -> Path:
    return write_run(
        tmp_path / "bench-fedavg",
        bench_fedavg_lines(),
        config={"strategy.name": "fedavg", "run-name": "bench-fedavg", "data.facilities": "polaris,aurora,frontier"},
    )


def make_report(runs: list[Path], out: Path, *flags: str) -> int:
    parser = argparse.ArgumentParser(prog="chemfl")
    report_cli.register(parser.add_subparsers(dest="room"))
    args = parser.parse_args(["report", *map(str, runs), "--out", str(out), *flags])
    return args.handler(args)


def png_width(path: Path) -> int:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">I", data[16:20])[0]


def assert_figure(path: Path) -> None:
    assert path.stat().st_size > 20_000
    assert png_width(path) >= 7 * 150  # 7 inches at >= 150 dpi
    pixels = matplotlib.image.imread(path)
    assert pixels.std() > 0.05  # something was drawn


# --- numbers ------------------------------------------------------------------------------------


def test_node_hours_busy_idle_lost_and_wasted_share_per_facility(fedbuff_campaign):
    summary = summarize(read_run(fedbuff_campaign), target=None)
    hours = {facility.facility: facility.node_hours for facility in summary.facilities}
    assert list(hours) == ["polaris", "aurora"]
    polaris, aurora, total = hours["polaris"], hours["aurora"], summary.total.node_hours
    assert (polaris.spent, polaris.busy, polaris.lost) == pytest.approx((19 / 6, 1.5, 1.0), abs=1e-12)
    assert polaris.idle == pytest.approx(2 / 3, abs=1e-12)
    assert polaris.wasted_share == pytest.approx(10 / 19, abs=1e-12)
    assert (aurora.spent, aurora.busy, aurora.lost, aurora.idle) == pytest.approx((1.0, 0.75, 0.0, 0.25), abs=1e-12)
    assert aurora.wasted_share == pytest.approx(0.25, abs=1e-12)
    assert (total.spent, total.busy, total.lost) == pytest.approx((25 / 6, 2.25, 1.0), abs=1e-12)
    assert total.wasted_share == pytest.approx(0.46, abs=1e-12)


def test_tallies_and_mean_staleness_over_every_arrival(fedbuff_campaign):
    summary = summarize(read_run(fedbuff_campaign), target=None)
    tallies = {facility.facility: facility.tally for facility in summary.facilities}
    assert (
        tallies["polaris"].accepted,
        tallies["polaris"].rejected,
        tallies["polaris"].stale,
        tallies["polaris"].lost,
    ) == (2, 0, 0, 1)
    assert (
        tallies["aurora"].accepted,
        tallies["aurora"].rejected,
        tallies["aurora"].stale,
        tallies["aurora"].lost,
    ) == (1, 1, 1, 0)
    assert tallies["polaris"].mean_staleness == 1.0  # (0 + 2) / 2
    assert tallies["aurora"].mean_staleness == pytest.approx(5 / 3)  # (1 + 0 + 4) / 3, refused ones included
    assert summary.total.tally.mean_staleness == pytest.approx(1.4)
    assert summary.run.versions == 3 and summary.run.strategy == "fedbuff"


def test_final_loss_and_time_to_target(fedbuff_campaign, fedavg_campaign):
    fedbuff, fedavg = (summarize(read_run(folder), target=1.0) for folder in (fedbuff_campaign, fedavg_campaign))
    assert fedbuff.final_loss == 0.9 and fedbuff.time_to_target == 5100.0
    assert fedavg.final_loss == 1.5 and fedavg.time_to_target is None
    assert summarize(read_run(fedbuff_campaign), target=None).time_to_target is None
    evaluations = [Evaluation(10.0, 2.0), Evaluation(20.0, 1.0), Evaluation(30.0, 0.5)]
    assert time_to_target(evaluations, 1.0) == 20.0  # "at or below"


def test_work_lost_at_a_walltime_end_and_jobs_after_it(fedavg_campaign):
    summary = summarize(read_run(fedavg_campaign), target=None)
    [frontier] = summary.facilities
    assert (
        frontier.node_hours.spent,
        frontier.node_hours.busy,
        frontier.node_hours.lost,
        frontier.node_hours.idle,
    ) == pytest.approx((2.5, 1.0, 1.0, 0.5), abs=1e-12)
    assert frontier.node_hours.wasted_share == pytest.approx(0.6)
    assert (frontier.tally.accepted, frontier.tally.lost) == (1, 1)


def test_a_job_left_open_by_the_log_runs_until_the_last_logged_time(tmp_path):
    """...and a facility the run line does not describe has one SuperNode per job (all 4 nodes busy)."""
    folder = write_run(
        tmp_path / "cut-short",
        [
            {"event": "run", "strategy": "fedbuff", "virtual_time": True},
            job("polaris", 1, "queued", 0, 4),
            job("polaris", 1, "running", 1800, 4),
            update("polaris", 1800, 5400, 0),
            version(1, 5400, 1.0),
        ],
    )
    [polaris] = summarize(read_run(folder), target=None).facilities
    assert (polaris.node_hours.spent, polaris.node_hours.busy) == pytest.approx((4.0, 4.0))


def test_work_lost_before_a_node_first_replied_goes_to_the_facility_its_updates_name(tmp_path):
    never_named = {**lost("aurora", 0, 600, "walltime: job ended"), "node": 99, "facility": None}
    folder = write_run(
        tmp_path / "first-task-lost",
        [
            {"event": "run", "strategy": "fedbuff", "virtual_time": True, "facilities": {"polaris": {}}},
            job("polaris", 1, "running", 0, 1),
            {**lost("polaris", 0, 900, "walltime: polaris's batch job ended"), "facility": None},
            never_named,
            update("polaris", 900, 1800, 0),
            job("polaris", 1, "ended", 1800, 1),
        ],
    )
    summary = summarize(read_run(folder), target=None)
    tallies = {facility.facility: facility.tally for facility in summary.facilities}
    assert {name: (t.lost, t.lost_at_walltime) for name, t in tallies.items()} == {"polaris": (1, 1), "unknown": (1, 1)}
    [polaris, _] = summary.facilities
    assert (polaris.node_hours.spent, polaris.node_hours.busy, polaris.node_hours.lost) == (0.5, 0.25, 0.25)


def test_labels_and_styles_keep_runs_of_one_strategy_apart(fedbuff_campaign, fedavg_campaign, tmp_path):
    other = write_run(
        tmp_path / "elsewhere" / "campaign-fedbuff", [version(1, 10.0, 1.0)], config={"strategy.name": "fedbuff"}
    )
    runs = read_runs([fedbuff_campaign, fedavg_campaign, other])
    assert run_labels(runs[:2]) == ["fedbuff", "fedavg"]
    assert run_labels(runs) == [f"fedbuff ({fedbuff_campaign})", "fedavg", f"fedbuff ({other})"]
    styles = run_styles(runs)
    assert styles[0].colour == styles[2].colour != styles[1].colour
    assert styles[0].linestyle != styles[2].linestyle and styles[0].hatch != styles[2].hatch


# --- the report folder ------------------------------------------------------------------------------


def test_report_writes_figures_and_summary_rows(fedbuff_campaign, fedavg_campaign, tmp_path, capsys):
    out = tmp_path / "reports" / "campaign"
    assert make_report([fedbuff_campaign, fedavg_campaign], out, "--target", "1.0") == 0
    assert sorted(path.name for path in out.iterdir()) == ["loss.png", "summary.md", "timeline.png", "updates.png"]
    for name in ("loss.png", "timeline.png", "updates.png"):
        assert_figure(out / name)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    summary = (out / "summary.md").read_text(encoding="utf-8")
    # 9000 s > 2 h: times in hours; 5100 s = 1.42 h.
    assert "| fedbuff | 0.900 | 1.42 | 3 | 3 | 1 | 1 | 1 | 1 | 4.17 | 2.25 | 46.0% |" in summary
    assert "| fedavg | 1.500 | not reached | 1 | 1 | 0 | 0 | 1 | 1 | 2.50 | 1.00 | 60.0% |" in summary
    assert "| polaris | 2 | 0 | 0 | 1 | 1 | 1.00 | 3.17 | 1.50 | 0.67 | 1.00 | 52.6% |" in summary
    assert "| aurora | 1 | 1 | 1 | 0 | 0 | 1.67 | 1.00 | 0.75 | 0.25 | 0.00 | 25.0% |" in summary
    assert "| **all** | 3 | 1 | 1 | 1 | 1 | 1.40 | 4.17 | 2.25 | 0.92 | 1.00 | 46.0% |" in summary
    assert "time to target 1 (h)" in summary and "Wasted share** = (idle + lost) / spent" in summary
    for name in ("loss.png", "timeline.png", "updates.png"):
        assert f"]({name})" in summary
    assert str(out) in capsys.readouterr().out


def test_plain_simulation_without_job_lines(plain_fedavg, fedbuff_campaign, tmp_path):
    run = read_run(plain_fedavg)
    assert [(e.time, e.loss) for e in run.evaluations] == [(12.6, 2.78), (341.9, 1.23), (611.1, 0.93), (851.4, 0.83)]
    summary = summarize(run, target=1.0)
    assert summary.time_to_target == 611.1 and run.versions == 3 and not run.virtual_time
    tallies = {facility.facility: facility.tally for facility in summary.facilities}
    assert list(tallies) == ["polaris", "aurora", "frontier"]  # data.facilities order
    assert (tallies["polaris"].accepted, tallies["polaris"].mean_staleness) == (3, 0.0)
    assert (tallies["frontier"].accepted, tallies["frontier"].mean_staleness) == (0, None)
    assert summary.total.node_hours is None

    alone = tmp_path / "plain-only"
    make_report([plain_fedavg], alone, "--target", "1.0")
    assert sorted(path.name for path in alone.iterdir()) == ["loss.png", "summary.md", "updates.png"]
    assert_figure(alone / "loss.png")
    text = (alone / "summary.md").read_text(encoding="utf-8")
    assert "| fedavg | 0.830 | 611 | 3 | 6 | 0 | 0 | 0 | 0 | – | – | – |" in text
    assert "No batch-job lines (plain simulation): fedavg." in text

    mixed = tmp_path / "mixed"
    make_report([plain_fedavg, fedbuff_campaign], mixed)
    assert (mixed / "timeline.png").is_file()  # drawn for the campaign only


def test_round_lines_written_before_the_event_key_are_read(tmp_path):
    lines = bench_fedavg_lines()
    for line in lines:
        del line["event"]
    run = read_run(write_run(tmp_path / "laptop", lines, config={"strategy.name": "fedavg"}))
    assert len(run.evaluations) == 4 and run.versions == 3


def test_an_existing_report_is_replaced_only_with_force(fedavg_campaign, tmp_path):
    out = tmp_path / "report"
    make_report([fedavg_campaign], out)
    with pytest.raises(ChemFLError, match="--force"):
        make_report([fedavg_campaign], out)
    (out / "stale.txt").write_text("from the earlier report")
    make_report([fedavg_campaign], out, "--force")
    assert not (out / "stale.txt").exists() and (out / "summary.md").is_file()
    not_a_report = tmp_path / "outputs"
    not_a_report.mkdir()
    (not_a_report / "config.json").write_text("{}")
    with pytest.raises(ChemFLError, match="not a report folder"):
        make_report([fedavg_campaign], not_a_report, "--force")
    assert (not_a_report / "config.json").is_file()


# --- errors ---------------------------------------------------------------------------------------


def test_a_folder_without_metrics_is_named(tmp_path):
    (tmp_path / "half-run").mkdir()
    with pytest.raises(ChemFLError, match=r"half-run has no metrics\.jsonl"):
        make_report([tmp_path / "half-run"], tmp_path / "out")
    with pytest.raises(ChemFLError, match="no such run folder"):
        read_run(tmp_path / "missing")
    assert not (tmp_path / "out").exists()


def test_an_empty_metrics_file_is_an_error(tmp_path):
    folder = write_run(tmp_path / "empty-run", [], config={"strategy.name": "fedavg"})
    with pytest.raises(ChemFLError, match=r"empty-run/metrics\.jsonl is empty"):
        read_run(folder)


def test_no_runs_is_an_error(tmp_path):
    with pytest.raises(ChemFLError, match="no run folders given"):
        make_report([], tmp_path / "out")
    with pytest.raises(ChemFLError, match="no run folders given"):
        read_runs([])


def test_malformed_lines_and_unknown_strategies_are_errors(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.jsonl").write_text(json.dumps(version(1, 1.0)) + '\n{"event": "upd')
    with pytest.raises(ChemFLError, match="line 2 is not JSON"):
        read_run(broken)
    missing_key = write_run(
        tmp_path / "missing-key", [{"event": "update", "facility": "polaris"}], config={"strategy.name": "fedbuff"}
    )
    with pytest.raises(ChemFLError, match="line 1: malformed 'update' line"):
        read_run(missing_key)
    nameless = write_run(tmp_path / "nameless", [version(1, 1.0, 1.0)])
    with pytest.raises(ChemFLError, match="cannot tell the strategy"):
        read_run(nameless)


def test_a_facility_evaluation_counts_at_its_versions_time(tmp_path):
    from chemfl import protocol

    folder = tmp_path / "eval-at-facility"
    folder.mkdir()
    lines = [
        protocol.VersionLine(0, 0.0),
        protocol.VersionLine(1, 5.0),
        protocol.EvaluationLine(0, 0.0, 40.0, "aurora", 3.0, {"loss": 3.0}),  # came back late
        protocol.EvaluationLine(1, 5.0, 41.0, "aurora", 2.0, {"loss": 2.0}),
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(protocol.to_json(line)) + "\n" for line in lines))
    (folder / "config.json").write_text(json.dumps({"strategy.name": "fedasync"}))
    run = read_run(folder)
    assert [(e.time, e.loss) for e in run.evaluations] == [(0.0, 3.0), (5.0, 2.0)]
    assert run.end_time == 41.0
