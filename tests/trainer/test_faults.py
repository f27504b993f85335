"""Faults in a running trainer end it, non-zero and within seconds, so the job script can end the
job: a rank killed mid-task (the request in flight gets the error), a rank that dies while the
trainer is idle (noticed at the next heartbeat), SIGTERM to rank 0 mid-task (the job is ending)."""

from __future__ import annotations

import os
import signal
import threading
import time

from chemfl.trainer.channel import TrainerError
from tests.trainer.harness import TrainerProcess, as_arrays, fresh_adapter

SECONDS = 15.0  # "within seconds", with room for two busy cores


def long_task_in_flight(trainer: TrainerProcess, config: dict) -> tuple[threading.Thread, dict]:
    """A train request of a million steps, running on every rank when this returns."""
    outcome: dict = {}
    sent = as_arrays(fresh_adapter(config)[0], config)

    def request() -> None:
        try:
            trainer.client(timeout=600).request("train", {"server-round": 1, "local-steps": 10**6}, config, sent)
        except TrainerError as error:
            outcome["error"], outcome["at"] = error, time.monotonic()

    pending = threading.Thread(target=request)
    pending.start()
    trainer.wait_for(r"rank 1/2 chemfl.trainer INFO: training 1000000 steps")
    return pending, outcome


def test_a_rank_killed_mid_task_fails_the_request_and_ends_the_trainer(trainer_setup, tmp_path):
    trainer = TrainerProcess(trainer_setup, tmp_path)
    try:
        trainer.wait_ready()
        victim = trainer.pid_of_rank(1)
        pending, outcome = long_task_in_flight(trainer, trainer_setup.config)
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        pending.join(SECONDS)
        status = trainer.exit_code(timeout=SECONDS)
        print(
            f"rank 1 killed: the request failed {outcome['at'] - killed:.1f} s later, the trainer exited "
            f"{status} {time.monotonic() - killed:.1f} s later; the error: {outcome['error']}"
        )
        assert outcome["at"] - killed < SECONDS and status != 0
        assert "train failed and the trainer stops" in str(outcome["error"])
        assert not trainer.socket.exists()
    finally:
        trainer.kill()


def test_a_rank_that_dies_while_idle_ends_the_trainer_at_the_next_heartbeat(trainer_setup, tmp_path):
    trainer = TrainerProcess(trainer_setup, tmp_path, extra=("--collective-timeout", "20"))  # heartbeat: 5 s
    try:
        trainer.wait_ready()
        killed = time.monotonic()
        os.kill(trainer.pid_of_rank(1), signal.SIGKILL)
        assert trainer.exit_code(timeout=SECONDS) != 0
        assert time.monotonic() - killed < SECONDS
        assert trainer.count(r"rank 0/2 chemfl.trainer ERROR: the trainer stops") == 1
    finally:
        trainer.kill()


def test_sigterm_to_rank_zero_mid_task_is_replied_and_ends_the_trainer(trainer_setup, tmp_path):
    trainer = TrainerProcess(trainer_setup, tmp_path)
    try:
        trainer.wait_ready()
        rank_zero = trainer.pid_of_rank(0)
        pending, outcome = long_task_in_flight(trainer, trainer_setup.config)
        os.kill(rank_zero, signal.SIGTERM)
        pending.join(SECONDS)
        assert "received SIGTERM" in str(outcome["error"])
        assert trainer.exit_code(timeout=SECONDS) != 0
    finally:
        trainer.kill()
