"""What rank 0 checks before a task starts: the same knobs as it loaded, and time to finish."""

from __future__ import annotations

import pytest

from chemfl.config import resolve
from chemfl.errors import ChemFLError
from chemfl.trainer.admission import StepTimeEstimate, check_run_config


def test_a_run_config_with_other_model_lora_or_train_knobs_is_refused():
    loaded = resolve({"train.lr": 0.01, "lora.r": 4})
    check_run_config(loaded, {"train.lr": 0.01, "lora.r": 4, "strategy.name": "fedbuff", "model.cache-dir": "/local"})
    with pytest.raises(ChemFLError, match=r"train\.lr \(trainer 0\.01, request 0\.001\).*restart it"):
        check_run_config(loaded, {"lora.r": 4})
    with pytest.raises(ChemFLError, match=r"model\.name .*model\.tiny .*lora\.r .*train\.lr .*and 1 more"):
        check_run_config(
            loaded,
            {"train.lr": 0.02, "lora.r": 8, "model.name": "x", "model.tiny": True, "train.seed": 1},
        )
    with pytest.raises(ChemFLError, match="unknown config key"):
        check_run_config(loaded, {"train.learning-rate": 0.01})


def test_a_task_that_cannot_finish_before_the_job_ends_is_refused():
    estimate = StepTimeEstimate()
    estimate.check_fits(10**6, walltime_left=60)  # nothing measured yet: nothing refused
    estimate.observe(steps=10, seconds=20.0)
    estimate.check_fits(30, walltime_left=61)
    estimate.check_fits(10**6, walltime_left=None)  # outside a batch job
    with pytest.raises(ChemFLError, match=r"31 local steps need about 62 s at 2\.00 s per step.*60 s of walltime"):
        estimate.check_fits(31, walltime_left=60)


def test_the_seconds_per_step_follow_the_machine_as_a_moving_average():
    estimate = StepTimeEstimate(momentum=0.5)
    estimate.observe(steps=4, seconds=4.0)
    estimate.observe(steps=2, seconds=6.0)
    assert estimate.seconds_per_step == pytest.approx(2.0)
    estimate.observe(steps=1, seconds=2.0)
    assert estimate.seconds_per_step == pytest.approx(2.0)
