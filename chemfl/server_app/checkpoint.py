"""Crash-safe checkpoints of the asynchronous server state, and resuming from them.

checkpoint/state.json names every array file it needs: the global adapter of the current version,
the optimizer moments, and one file per buffered delta. Array files are written (to a temporary
name, then renamed) before state.json is replaced, and only files state.json no longer names are
deleted, so a crash at any point leaves a consistent checkpoint. Each buffered delta is written
once, when it arrives; the global adapter once per version: checkpointing after every update
costs one small JSON write plus what is new.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chemfl.errors import ChemFLError
from chemfl.files import write_file_atomically
from chemfl.server_app.rules import FedAsyncRule, FedBuffRule

STATE = "state.json"


@dataclass
class AsyncState:
    params: dict[str, np.ndarray]
    version: int = 0
    task_counter: int = 0
    counters: Counter = field(default_factory=Counter)
    updates_by_facility: Counter = field(default_factory=Counter)
    elapsed: float = 0.0  # wall seconds of the run before this process (resume)
    last_evaluated: int = -1
    resumed: bool = False


def _write_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    temporary = path.with_name(f".{path.name}.partial-{os.getpid()}")
    with temporary.open("wb") as handle:
        np.savez(handle, **arrays)
    os.replace(temporary, path)


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {name: data[name] for name in data.files}


class Checkpointer:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._buffer_files: dict[int, str] = {}  # id(delta) -> file, for deltas still buffered
        self._sequence = 0

    def save(self, state: AsyncState, strategy: FedBuffRule | FedAsyncRule) -> None:
        files = {"global": f"global-v{state.version}.npz"}
        if not (self.folder / files["global"]).exists():
            _write_arrays(self.folder / files["global"], state.params)
        buffer = []
        if isinstance(strategy, FedBuffRule):
            live = {}
            for delta, weight in strategy.buffer:
                name = self._buffer_files.get(id(delta))
                if name is None:
                    self._sequence += 1
                    name = f"buffer-{self._sequence}.npz"
                    _write_arrays(self.folder / name, delta)
                live[id(delta)] = name
                buffer.append({"file": name, "weight": weight})
            self._buffer_files = live
            optimizer = strategy.optimizer_state
            files["optimizer"] = f"optimizer-v{state.version}-s{optimizer.step}.npz"
            if optimizer.step and not (self.folder / files["optimizer"]).exists():
                _write_arrays(
                    self.folder / files["optimizer"],
                    {
                        **{f"m/{k}": v for k, v in optimizer.first_moment.items()},
                        **{f"v/{k}": v for k, v in optimizer.second_moment.items()},
                    },
                )
        document = {
            "version": state.version,
            "task_counter": state.task_counter,
            "elapsed": state.elapsed,
            "last_evaluated": state.last_evaluated,
            "counters": dict(state.counters),
            "updates_by_facility": dict(state.updates_by_facility),
            "files": files,
            "buffer": buffer,
            "optimizer_step": strategy.optimizer_state.step if isinstance(strategy, FedBuffRule) else 0,
            "sequence": self._sequence,
        }
        write_file_atomically(self.folder / STATE, json.dumps(document, indent=1, sort_keys=True))
        keep = {STATE, *files.values(), *(entry["file"] for entry in buffer)}
        for path in self.folder.iterdir():
            if path.name not in keep and not path.name.startswith("."):
                path.unlink()

    def load(self, strategy: FedBuffRule | FedAsyncRule) -> AsyncState:
        """The saved state; the strategy's buffer and optimizer state are restored in place."""
        state_file = self.folder / STATE
        if not state_file.is_file():
            raise ChemFLError(f"nothing to resume: {state_file} does not exist (is this an asynchronous run's folder?)")
        document = json.loads(state_file.read_text(encoding="utf-8"))
        files = document["files"]
        state = AsyncState(
            params=_read_arrays(self.folder / files["global"]),
            version=document["version"],
            task_counter=document["task_counter"],
            counters=Counter(document["counters"]),
            updates_by_facility=Counter(document["updates_by_facility"]),
            elapsed=document["elapsed"],
            last_evaluated=document["last_evaluated"],
            resumed=True,
        )
        self._sequence = document["sequence"]
        if isinstance(strategy, FedBuffRule):
            strategy.buffer = []
            self._buffer_files = {}
            for entry in document["buffer"]:
                delta = _read_arrays(self.folder / entry["file"])
                strategy.buffer.append((delta, float(entry["weight"])))
                self._buffer_files[id(delta)] = entry["file"]
            strategy.optimizer_state.step = document["optimizer_step"]
            if "optimizer" in files and (self.folder / files["optimizer"]).exists():
                moments = _read_arrays(self.folder / files["optimizer"])
                strategy.optimizer_state.first_moment = {k[2:]: v for k, v in moments.items() if k.startswith("m/")}
                strategy.optimizer_state.second_moment = {k[2:]: v for k, v in moments.items() if k.startswith("v/")}
        return state
