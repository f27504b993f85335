"""Starting a trainer: the backend and each rank's device, and the mistakes a job script can make,
each refused with the fix (most before torch loads)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from chemfl.errors import ChemFLError
from chemfl.trainer import group
from chemfl.trainer.channel import write_secret
from chemfl.trainer.group import choose_backend, rank_device
from chemfl.trainer.ranks import RankEnv
from chemfl.trainer.service import TrainerSettings, run_trainer
from tests.trainer.harness import REPOSITORY


@pytest.fixture
def no_accelerators(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(group, "_xpu_available", lambda: False)


def test_backends_follow_the_accelerators_and_missing_ones_are_named(no_accelerators, monkeypatch):
    assert choose_backend("auto") == "gloo"
    with pytest.raises(ChemFLError, match="--backend nccl needs CUDA .* use --backend gloo on CPUs"):
        choose_backend("nccl")
    for backend in ("xccl", "ccl"):
        with pytest.raises(ChemFLError, match=f"--backend {backend} needs Intel GPUs"):
            choose_backend(backend)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_backend("auto") == "nccl"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(group, "_xpu_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_backend_available", lambda name: name == "xccl")
    assert choose_backend("auto") == "xccl"
    monkeypatch.setattr(torch.distributed, "is_backend_available", lambda name: False)
    monkeypatch.setattr(group, "_register_ccl", lambda: False)
    with pytest.raises(ChemFLError, match="no collective backend for Intel GPUs"):
        choose_backend("auto")


def test_each_rank_takes_its_local_gpu_or_the_one_it_was_pinned_to(no_accelerators, monkeypatch):
    assert rank_device(3) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert rank_device(2) == torch.device("cuda", 2)
    with pytest.raises(ChemFLError, match="shows 4 cuda devices: start at most 4 ranks per node"):
        rank_device(4)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # CUDA_VISIBLE_DEVICES pinned one GPU
    assert rank_device(3) == torch.device("cuda", 0)


def test_qlora_is_refused_on_more_than_one_rank(tmp_path):
    from chemfl.config import resolve

    settings = TrainerSettings(
        resolve({"model.quantization": "4bit"}), tmp_path, None, tmp_path / "s.sock", b"", "gloo", None, 60.0
    )
    with pytest.raises(ChemFLError, match="QLoRA.* trains on one device, but 2 ranks were started"):
        run_trainer(settings, RankEnv(0, 2, 0, "127.0.0.1", 29500, "torchrun"), started=0.0)


def chemfl(*argv: str) -> tuple[int, str, list[str]]:
    """`chemfl ARGV` in a fresh interpreter: (status, stderr, the heavy modules it loaded)."""
    probe = (
        "import sys, json\n"
        "from chemfl.cli import main\n"
        "try:\n"
        f"    status = main({list(argv)!r})\n"
        "except SystemExit as exit:\n"
        "    status = exit.code\n"
        "heavy = [name for name in ('torch', 'transformers', 'peft') if name in sys.modules]\n"
        "print(json.dumps([status, heavy]))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPOSITORY, capture_output=True, text=True, timeout=120)
    status, heavy = json.loads(done.stdout.strip().splitlines()[-1])
    return status, done.stderr, heavy


def test_job_script_mistakes_are_reported_before_torch_loads(trainer_setup, tmp_path):
    status, _, heavy = chemfl("trainer", "--help")
    assert (status, heavy) == (0, [])
    serve = ["trainer", "--run-config", str(trainer_setup.recipe), "--data-path", str(trainer_setup.shard)]
    secret = tmp_path / "job" / "secret"
    status, error, heavy = chemfl(*serve, "--socket", str(tmp_path / "s.sock"), "--secret-file", str(secret))
    assert (status, heavy) == (2, []) and f"--secret-file {secret} --new-secret" in error
    assert chemfl("trainer", "--secret-file", str(secret), "--new-secret")[0] == 0
    assert secret.stat().st_mode & 0o777 == 0o600
    secret.chmod(0o640)
    status, error, heavy = chemfl(*serve, "--socket", str(tmp_path / "s.sock"), "--secret-file", str(secret))
    assert (status, heavy) == (2, []) and "has mode 0640; it must be 0600" in error
    secret.chmod(0o600)
    (tmp_path / "file").write_text("")
    status, error, heavy = chemfl(*serve, "--socket", str(tmp_path / "file" / "s.sock"), "--secret-file", str(secret))
    assert (status, heavy) == (2, []) and "cannot create the socket's folder" in error
    status, error, _ = chemfl("trainer", "--data-path", str(trainer_setup.shard), "--secret-file", str(secret))
    assert status == 2 and "needs --run-config, --socket to serve" in error


def test_a_backend_without_its_accelerator_stops_the_rank_with_the_fix(trainer_setup, tmp_path):
    secret = write_secret(tmp_path / "secret")
    status, error, _ = chemfl(
        "trainer",
        "--run-config",
        str(trainer_setup.recipe),
        "--data-path",
        str(trainer_setup.shard),
        "--socket",
        str(tmp_path / "run" / "s.sock"),
        "--secret-file",
        str(secret),
        "--backend",
        "nccl",
    )
    assert status == 2 and "chemfl: error: --backend nccl needs CUDA" in error


@pytest.mark.parametrize(
    "module", ["chemfl.trainer.channel", "chemfl.trainer.ranks", "chemfl.trainer.admission", "chemfl.trainer.cli"]
)
def test_the_relays_side_loads_neither_torch_nor_flower(module):
    code = f"import sys, {module}; print([m for m in ('torch', 'flwr') if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
