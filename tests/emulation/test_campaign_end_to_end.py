"""An emulated campaign through `flwr run` (simulation engine, virtual time), then `chemfl report`."""

import json
from pathlib import Path

import tomli_w

from chemfl.cli import main as chemfl
from chemfl.simulation import simulate
from tests.tiny import save_tiny_llama

PROJECT = Path(__file__).resolve().parents[2]


def test_walltime_aware_campaign_runs_in_virtual_time_loses_nothing_and_reports(tmp_path):
    run_config = {
        "run-name": "campaign",
        "data.path": str(tmp_path / "data"),
        "data.max-molecules": 30,
        "data.facilities": "polaris,frontier,perlmutter",
        "model.name": save_tiny_llama(tmp_path / "tiny-llama"),
        "model.gguf-file": "",
        "lora.r": 4,
        "lora.alpha": 8,
        "train.local-steps": 3,
        "train.batch-size": 2,
        "train.max-length": 128,
        "strategy.name": "walltime-aware",
        "strategy.num-versions": 1000,
        "strategy.max-seconds": 3 * 3600.0,
        "strategy.buffer-size": 2,
        "strategy.max-local-steps": 6,
        "eval.every": 1,
        "eval.loss-per-task": 2,
        "eval.generate-per-task": 0,
        "outputs.dir": str(tmp_path / "outputs"),
        "outputs.keep-every-adapter": False,
        "emulation.virtual-time": True,
        "emulation.seconds-per-step": "polaris=300,frontier=400,perlmutter=300",
        "emulation.walltime": "polaris=3600,frontier=7200,perlmutter=1800",
        "emulation.queue-median": "polaris=600,frontier=1800,perlmutter=300",
        "emulation.startup-seconds": "polaris=120,frontier=150,perlmutter=120",
        "emulation.task-overhead-seconds": 30.0,
    }
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(tomli_w.dumps(run_config))
    completed = simulate(recipe, PROJECT, tmp_path, cpus_per_client=1, capture=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "campaign"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["event"] == "run" and lines[0]["virtual_time"] is True
    jobs = [line for line in lines if line["event"] == "job"]
    assert {line["facility"] for line in jobs if line["state"] == "running"} == {"polaris", "frontier", "perlmutter"}
    updates = [line for line in lines if line["event"] == "update"]
    assert len(updates) >= 6 and not [line for line in lines if line["event"] == "lost"]
    assert all(
        line["walltime_remaining"] >= 0
        and line["train_seconds"]
        == line["steps"] * {"polaris": 300, "frontier": 400, "perlmutter": 300}[line["facility"]]
        for line in updates
    )
    assert max(line["arrival_time"] for line in updates) <= 3 * 3600
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(run_dir.glob("adapter-version-*"))  # outputs.keep-every-adapter = false

    assert chemfl(["report", str(run_dir), "--out", str(tmp_path / "report")]) == 0
    for name in ("loss.png", "timeline.png", "updates.png", "summary.md"):
        assert (tmp_path / "report" / name).stat().st_size > 1000
