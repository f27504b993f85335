"""The surrogate objective: its losses, its local training, and a whole campaign through the real
strategies, loop and emulated grid (`chemfl emulate`), as the campaign study runs it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from chemfl.checks import check_run_config
from chemfl.cli import main as chemfl
from chemfl.config import resolve
from chemfl.data_prep.cli import load_run_config
from chemfl.emulation.surrogate import SurrogateObjective, run_surrogate_campaign
from chemfl.errors import ChemFLError
from chemfl.report.runs import read_run, summarize

PROJECT = Path(__file__).resolve().parents[2]
SPIKES = PROJECT / "recipes" / "four-facilities-spikes.toml"
FACILITIES = ("polaris", "aurora", "frontier", "perlmutter")


def objective(by_task: bool = True) -> SurrogateObjective:
    return SurrogateObjective(FACILITIES, by_task=by_task, examples_per_step=8)


def test_test_loss_is_the_floor_at_the_pooled_optimum_and_floor_plus_excess_at_zero():
    surrogate = objective()
    assert surrogate.test_loss(surrogate.centre) == pytest.approx(surrogate.floor)
    assert surrogate.test_loss(np.zeros(surrogate.dims)) == pytest.approx(surrogate.floor + surrogate.initial_excess)
    # No facility's own optimum is best for the federation: the non-IID spread.
    assert all(surrogate.test_loss(surrogate.optimum(f)) > surrogate.floor + 0.01 for f in FACILITIES)


def test_by_task_data_gives_each_facility_its_own_directions_and_spreads_the_shared_optimum():
    by_task, iid = objective(True), objective(False)
    assert iid.uses("aurora").all() and by_task.uses("aurora").sum() == by_task.shared_dims + by_task.task_dims
    assert not (by_task.uses("aurora") * by_task.uses("frontier"))[by_task.shared_dims :].any()

    def spread(surrogate: SurrogateObjective) -> float:  # relative to the shared optimum
        distances = [np.linalg.norm(surrogate.optimum(f) - surrogate.centre) for f in FACILITIES]
        return float(np.mean(distances) / np.linalg.norm(surrogate.centre[: surrogate.shared_dims]))

    assert spread(by_task) > 5 * spread(iid)
    config = resolve(load_run_config(str(SPIKES)))
    assert SurrogateObjective.for_run(config, check_run_config(config)).by_task  # the study's recipes


def test_training_on_one_task_group_forgets_the_others():
    surrogate = objective(True)
    own = surrogate.uses("frontier").astype(bool)
    learnt = surrogate.centre.copy()  # every group learnt
    trained = surrogate.train("frontier", learnt, steps=20, lr_scale=1.0, seed=[0])
    assert np.all(np.abs(trained[~own]) < np.abs(learnt[~own]))  # pulled back towards the untrained model
    assert surrogate.loss("aurora", trained) > surrogate.loss("aurora", learnt)
    untouched = surrogate.train("frontier", np.zeros(surrogate.dims), steps=20, lr_scale=1.0, seed=[0])
    np.testing.assert_array_equal(untouched[~own], 0.0)  # nothing to forget, nothing learnt elsewhere


def test_local_training_moves_towards_the_facility_optimum_at_the_scaled_rate():
    surrogate = objective()
    start = np.zeros(surrogate.dims)
    short = surrogate.train("aurora", start, steps=5, lr_scale=1.0, seed=[0, 2, 1])
    long = surrogate.train("aurora", start, steps=50, lr_scale=1.0, seed=[0, 2, 1])
    assert surrogate.loss("aurora", long) < surrogate.loss("aurora", short) < surrogate.loss("aurora", start)
    np.testing.assert_array_equal(surrogate.train("aurora", start, 5, 0.0, [0, 2, 1]), start)  # lr x 0
    np.testing.assert_array_equal(short, surrogate.train("aurora", start, 5, 1.0, [0, 2, 1]))  # seeded
    assert not np.array_equal(short, surrogate.train("aurora", start, 5, 1.0, [0, 2, 2]))  # another task


def study_config(tmp_path: Path, **changes) -> dict:
    return resolve(
        {
            **load_run_config(str(SPIKES)),
            "outputs.dir": str(tmp_path),
            "strategy.max-seconds": 6 * 3600.0,
            **changes,
        }
    )


def lines(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def without_wall_clock(line: dict) -> dict:
    return {k: v for k, v in line.items() if k not in ("server_seconds", "evaluation_seconds")}


@pytest.mark.parametrize("strategy", ["fedavg", "fedqueue"])
def test_a_seed_gives_the_same_campaign_and_another_seed_another(tmp_path, strategy):
    first = run_surrogate_campaign(study_config(tmp_path, **{"strategy.name": strategy, "run-name": "a"}))
    again = run_surrogate_campaign(study_config(tmp_path, **{"strategy.name": strategy, "run-name": "b"}))
    other = run_surrogate_campaign(
        study_config(tmp_path, **{"strategy.name": strategy, "run-name": "c", "emulation.seed": 1})
    )
    assert [without_wall_clock(x) for x in lines(first)] == [without_wall_clock(x) for x in lines(again)]
    assert [without_wall_clock(x) for x in lines(first)] != [without_wall_clock(x) for x in lines(other)]
    versions = [line for line in lines(first) if line["event"] == "version"]
    assert versions[-1]["eval_loss"] < versions[0]["eval_loss"] - 1.0  # it learns


def test_chemfl_emulate_writes_a_run_folder_that_report_reads(tmp_path, capsys):
    code = chemfl(
        [
            "emulate",
            str(SPIKES),
            "--set",
            "strategy.name=walltime-aware",
            "--set",
            f"outputs.dir={tmp_path}",
            "--set",
            "strategy.target-loss=2.5",
        ]
    )
    assert code == 0
    folder = tmp_path / "four-facilities-spikes"
    assert str(folder) in capsys.readouterr().out
    run_line = lines(folder)[0]
    assert run_line["event"] == "run" and run_line["objective"] == "surrogate"
    summary = summarize(read_run(folder), 2.5)
    assert summary.time_to_target is not None and summary.final_loss <= 2.5
    assert summary.total.tally.lost_at_walltime == 0  # walltime-aware sends nothing that cannot finish
    assert chemfl(["report", str(folder), "--target", "2.5", "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "timeline.png").is_file()


def test_a_recipe_without_virtual_time_is_a_clear_error(tmp_path):
    with pytest.raises(ChemFLError, match="emulation.virtual-time = true"):
        run_surrogate_campaign(study_config(tmp_path, **{"emulation.virtual-time": False, "strategy.name": "fedbuff"}))
    with pytest.raises(ChemFLError, match="virtual-time"):
        run_surrogate_campaign(study_config(tmp_path, **{"strategy.name": "centralized"}))
