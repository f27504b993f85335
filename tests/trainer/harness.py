"""What the trainer's tests share: a real trainer (torchrun ranks on the CPU, gloo, in a process
group of their own so a test stops exactly what it started, output collected line by line), and
fresh replicas at the seeded adapter every rank starts from."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from chemfl.llm.lora import attach_lora, packed_state
from chemfl.llm.model import LoraSpec, ModelSpec, load_base_model
from chemfl.trainer.channel import TrainerClient, write_secret
from tests.trainer.conftest import TrainerSetup

TORCHRUN = Path(sys.executable).parent / "torchrun"
REPOSITORY = Path(__file__).resolve().parents[2]


def run_two_ranks(script: str, case: dict, folder: Path) -> np.lib.npyio.NpzFile:
    """torchrun two gloo ranks of tests/trainer/<script> on `case` (written as JSON); what they saved."""
    case_file, out = folder / "case.json", folder / "ranks.npz"
    case_file.write_text(json.dumps(case))
    done = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", str(REPOSITORY / "tests" / "trainer" / script)]
        + [str(case_file), str(out)],
        cwd=REPOSITORY,
        env={**os.environ, "PYTHONPATH": str(REPOSITORY), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return np.load(out)


def fresh_adapter(config: dict) -> tuple[object, object]:
    """(peft model, tokenizer) on the CPU, its adapter at the seeded initialisation every rank has."""
    base, tokenizer = load_base_model(ModelSpec.from_config(config), torch.device("cpu"))
    return attach_lora(base, LoraSpec.from_config(config), quantized=False), tokenizer


def as_arrays(model, config: dict) -> dict[str, np.ndarray]:
    """The exchanged adapter as the relay sends it: packed into one vector."""
    return packed_state(model, LoraSpec.from_config(config))


def max_difference(first: dict[str, np.ndarray], second: dict[str, np.ndarray]) -> float:
    assert list(first) == list(second)
    return max(float(np.abs(first[name] - second[name]).max()) for name in first)


class TrainerProcess:
    def __init__(self, setup: TrainerSetup, folder: Path, ranks: int = 2, extra: tuple[str, ...] = ()):
        self.socket = folder / "run" / "trainer.sock"
        self.secret = write_secret(folder / "secret")
        command = [
            str(TORCHRUN),
            "--standalone",
            "--nproc-per-node",
            str(ranks),
            "--monitor-interval",
            "0.2",
            "-m",
            "chemfl.trainer",
            "--run-config",
            str(setup.recipe),
            "--data-path",
            str(setup.shard),
            "--socket",
            str(self.socket),
            "--secret-file",
            str(self.secret),
            "--backend",
            "gloo",
            *extra,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            command,
            cwd=REPOSITORY,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        for stream, lines in ((self.process.stdout, self.stdout), (self.process.stderr, self.stderr)):
            threading.Thread(target=lambda s=stream, out=lines: out.extend(s), daemon=True).start()

    def wait_for(self, pattern: str, timeout: float = 120.0, stream: str = "stderr") -> re.Match:
        """The first line of `stream` matching `pattern`; fails if the trainer exits or time runs out."""
        lines = self.stdout if stream == "stdout" else self.stderr
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(lines):
                found = re.search(pattern, line)
                if found:
                    return found
            if self.process.poll() is not None:
                time.sleep(0.5)  # let the readers drain
                raise AssertionError(f"trainer exited ({self.process.returncode}):\n{self.log()}")
            time.sleep(0.1)
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n{self.log()}")

    def wait_ready(self) -> float:
        return float(self.wait_for(r"^trainer ready in (\d+\.\d) s$", stream="stdout").group(1))

    def pid_of_rank(self, rank: int) -> int:
        return int(self.wait_for(rf"rank {rank}/\d+ chemfl.trainer INFO: pid (\d+)").group(1))

    def count(self, pattern: str) -> int:
        return sum(1 for line in self.stderr if re.search(pattern, line))

    def client(self, timeout: float = 120.0) -> TrainerClient:
        return TrainerClient(self.socket, self.secret, timeout=timeout)

    def exit_code(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def log(self) -> str:
        return "".join(self.stdout[-20:]) + "".join(self.stderr[-60:])

    def kill(self) -> None:
        """SIGKILL torchrun and its ranks (the session this test started), if still running."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
