"""outputs/<run-name>/: resolved config, metrics.jsonl, PEFT adapters, the before/after summary."""

from __future__ import annotations

import json
import os
from pathlib import Path

from chemfl.errors import ChemFLError
from chemfl.files import write_file_atomically
from chemfl.llm.lora import save_adapter

METRICS = "metrics.jsonl"
# Lines a resumed run found after its checkpoint's end of metrics.jsonl, kept for the record.
AFTER_CHECKPOINT = "metrics-after-checkpoint.jsonl"


class RunOutputs:
    """The latest run of a name is always at outputs/<run-name>; an earlier run found there is
    moved aside to outputs/<run-name>.<n> first, so nothing already written is lost. A resumed run
    continues in the folder it resumes (metrics.jsonl is appended to)."""

    def __init__(self, root: Path, run_name: str, resume: Path | None = None):
        self.dir = Path(resume) if resume is not None else Path(root) / run_name
        if resume is not None:
            if not self.dir.is_dir():
                raise ChemFLError(f"resume = {resume}: no such run folder")
        elif self.dir.exists() and any(self.dir.iterdir()):
            n = 1
            while self.dir.with_name(f"{run_name}.{n}").exists():
                n += 1
            os.replace(self.dir, self.dir.with_name(f"{run_name}.{n}"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / METRICS

    def write_json(self, name: str, data: dict) -> Path:
        """Written to a temporary file, then renamed: never half-written."""
        path = self.dir / name
        write_file_atomically(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
        return path

    def append_metrics(self, line: dict) -> None:
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(line, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def rewind_metrics(self, size: int | None) -> int:
        """metrics.jsonl as it was when the checkpoint a resumed run continues from was saved (its
        `journal_bytes`; None: not recorded, nothing to do). Lines written after it (the ServerApp died
        between an update's lines and its checkpoint, e.g. while a new version was evaluated) describe
        work the checkpoint does not count and that the resumed run redoes: they are appended to
        metrics-after-checkpoint.jsonl and cut from metrics.jsonl. Returns how many lines moved."""
        if size is None or not self.metrics_path.is_file():
            return 0
        with self.metrics_path.open("r+b") as handle:
            if os.fstat(handle.fileno()).st_size <= size:
                return 0
            handle.seek(size)
            tail = handle.read()
            with (self.dir / AFTER_CHECKPOINT).open("ab") as aside:
                aside.write(tail if tail.endswith(b"\n") else tail + b"\n")  # a line cut short by the crash
                aside.flush()
                os.fsync(aside.fileno())
            handle.truncate(size)
            handle.flush()
            os.fsync(handle.fileno())
        return len(tail.rstrip(b"\n").split(b"\n"))

    def save_adapter(self, model, name: str) -> Path:
        return save_adapter(model, self.dir / name)
