"""Crash-safe checkpoints of the asynchronous server state, and resuming from them.

checkpoint/state.json names every array file it needs: the global adapter of the current version,
the optimizer moments, and one file per buffered delta. Array files are written (to a temporary
name, then renamed) before state.json is replaced, and only files state.json no longer names are
deleted, so a crash at any point leaves a consistent checkpoint. Each buffered delta is written
once, when it arrives; the global adapter once per version: checkpointing after every update
costs one small JSON write plus what is new.

state.json also lists each array file's arrays (dtype and shape). Loading reads and checks
everything (JSON, every named file, the .npz archives' checksums, the listing) before it restores
anything, and writes nothing: a damaged checkpoint is a ChemFLError naming the file and the fix.
`checkpoint_misfit_message` says why a sound checkpoint does not fit a run's model and LoRA settings.

With a `journal` (the run's metrics.jsonl), state.json also records how many bytes of it were written
when it was saved. The loop writes an update's lines (and a new version's, after its evaluation) before
it checkpoints; a ServerApp that dies in between leaves lines the checkpoint does not count. A resumed
run moves them aside first (RunOutputs.rewind_metrics), so that metrics.jsonl and the counters agree.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chemfl.config import Scalar
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
    journal_bytes: int | None = None  # metrics.jsonl's size at the checkpoint (None: not recorded)


def _write_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    temporary = path.with_name(f".{path.name}.partial-{os.getpid()}")
    with temporary.open("wb") as handle:
        np.savez(handle, **arrays)
    os.replace(temporary, path)


FIX = "start a fresh run (without resume) or restore the folder from a backup"


def _damaged(path: Path, reason: str) -> ChemFLError:
    return ChemFLError(f"{path} is damaged ({reason}); {FIX}")


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of one .npz file; a damaged or unreadable file is a ChemFLError naming it."""
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        with data:
            return {name: data[name] for name in data.files}
    except Exception as error:  # a damaged zip raises nearly anything: BadZipFile, zlib.error, NotImplementedError
        raise _damaged(path, f"not a readable .npz file: {type(error).__name__}: {error}") from None


def _listing(arrays: dict[str, np.ndarray]) -> dict[str, list]:
    """What state.json records of an array file: each array's dtype and shape (as JSON reads back)."""
    return {name: [np.asarray(array).dtype.str, *np.shape(array)] for name, array in sorted(arrays.items())}


def _shapes(arrays: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(array.shape) for name, array in arrays.items()}


def _field(document: dict, key: str, kind: type | tuple[type, ...], state_file: Path):
    if key not in document:
        raise _damaged(state_file, f"no {key!r}")
    value = document[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise _damaged(state_file, f"{key!r} = {value!r} has the wrong type")
    return value


class Checkpointer:
    def __init__(self, folder: Path, journal: Path | None = None) -> None:
        self.folder = Path(folder)  # made by the first save: a failed load leaves no trace
        self.journal = None if journal is None else Path(journal)  # metrics.jsonl: its size goes in state.json
        self._buffer_files: dict[int, str] = {}  # id(delta) -> file, for deltas still buffered
        self._sequence = 0

    def save(self, state: AsyncState, strategy: FedBuffRule | FedAsyncRule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        files = {"global": f"global-v{state.version}.npz"}
        listing = {files["global"]: _listing(state.params)}
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
                listing[name] = _listing(delta)
                buffer.append({"file": name, "weight": weight})
            self._buffer_files = live
            optimizer = strategy.optimizer_state
            files["optimizer"] = f"optimizer-v{state.version}-s{optimizer.step}.npz"
            moments = {
                **{f"m/{k}": v for k, v in optimizer.first_moment.items()},
                **{f"v/{k}": v for k, v in optimizer.second_moment.items()},
            }
            if optimizer.step:
                listing[files["optimizer"]] = _listing(moments)
                if not (self.folder / files["optimizer"]).exists():
                    _write_arrays(self.folder / files["optimizer"], moments)
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
            "journal_bytes": self._journal_bytes(),
            "arrays": listing,  # file -> array -> [dtype, *shape]: what each file must hold on load
        }
        write_file_atomically(self.folder / STATE, json.dumps(document, indent=1, sort_keys=True))
        keep = {STATE, *files.values(), *(entry["file"] for entry in buffer)}
        for path in self.folder.iterdir():
            if path.name not in keep and not path.name.startswith("."):
                path.unlink()

    def _journal_bytes(self) -> int | None:
        """The journal's size now: every line written so far (they are flushed and fsynced one by one)."""
        if self.journal is None:
            return None
        try:
            return self.journal.stat().st_size
        except FileNotFoundError:
            return 0

    def load(self, strategy: FedBuffRule | FedAsyncRule) -> AsyncState:
        """The saved state; the strategy's buffer and optimizer state are restored in place.

        Everything is read and checked before the strategy is touched, and nothing in the folder
        is written: a damaged checkpoint is a ChemFLError naming the file, and stays as it was."""
        state_file = self.folder / STATE
        if not state_file.is_file():
            raise ChemFLError(f"nothing to resume: {state_file} does not exist (is this an asynchronous run's folder?)")
        document = self._read_state(state_file)
        number = (int, float)
        files = _field(document, "files", dict, state_file)
        listed = document.get("arrays")
        state = AsyncState(
            params=self._read_named(files.get("global"), state_file, "files.global", listed),
            version=_field(document, "version", int, state_file),
            task_counter=_field(document, "task_counter", int, state_file),
            counters=Counter(_field(document, "counters", dict, state_file)),
            updates_by_facility=Counter(_field(document, "updates_by_facility", dict, state_file)),
            elapsed=float(_field(document, "elapsed", number, state_file)),
            last_evaluated=_field(document, "last_evaluated", int, state_file),
            resumed=True,
        )
        sequence = _field(document, "sequence", int, state_file)
        journal_bytes = document.get("journal_bytes")  # absent or None: a checkpoint without a journal
        if journal_bytes is not None and (
            not isinstance(journal_bytes, int) or isinstance(journal_bytes, bool) or journal_bytes < 0
        ):
            raise _damaged(state_file, f"'journal_bytes' = {journal_bytes!r} is not a byte count")
        state.journal_bytes = journal_bytes
        optimizer_step = _field(document, "optimizer_step", int, state_file)
        buffer: list[tuple[dict[str, np.ndarray], float, str]] = []
        moments: dict[str, np.ndarray] = {}
        if isinstance(strategy, FedBuffRule):
            for position, entry in enumerate(_field(document, "buffer", list, state_file)):
                where = f"buffer[{position}]"
                if not isinstance(entry, dict) or not isinstance(entry.get("weight"), number):
                    raise _damaged(state_file, f"{where} = {entry!r} is not {{file, weight}}")
                delta = self._read_named(entry.get("file"), state_file, f"{where}.file", listed)
                buffer.append((delta, float(entry["weight"]), entry["file"]))
            if optimizer_step > 0:  # the moments are written once the optimizer has stepped
                moments = self._read_named(files.get("optimizer"), state_file, "files.optimizer", listed)
            # Buffered deltas and moments live in the space the rule aggregates in (the LoRA
            # factors, or their products for lora.aggregation = svd): they must all agree.
            spaces = [(name, _shapes(delta)) for delta, _, name in buffer]
            if moments:
                for part in ("m/", "v/"):
                    moment = {k[2:]: v for k, v in moments.items() if k.startswith(part)}
                    spaces.append((f"{files['optimizer']} ({part[0]})", _shapes(moment)))
            for name, shapes in spaces[1:]:
                if shapes != spaces[0][1]:
                    raise _damaged(self.folder, f"{spaces[0][0]} and {name} hold different arrays")
        # Everything read: now restore the strategy.
        self._sequence = sequence
        if isinstance(strategy, FedBuffRule):
            strategy.buffer = []
            self._buffer_files = {}
            for delta, weight, name in buffer:
                strategy.buffer.append((delta, weight))
                self._buffer_files[id(delta)] = name
            strategy.optimizer_state.step = optimizer_step
            if moments:
                strategy.optimizer_state.first_moment = {k[2:]: v for k, v in moments.items() if k.startswith("m/")}
                strategy.optimizer_state.second_moment = {k[2:]: v for k, v in moments.items() if k.startswith("v/")}
        return state

    def _read_state(self, state_file: Path) -> dict:
        try:
            document = json.loads(state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise _damaged(state_file, f"not readable JSON: {error}") from None
        if not isinstance(document, dict):
            raise _damaged(state_file, "not a JSON object")
        return document

    def _read_named(self, name: object, state_file: Path, key: str, listed: object) -> dict[str, np.ndarray]:
        """The arrays of the file state.json names under `key`: a plain .npz name in this folder."""
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(".npz"):
            raise _damaged(state_file, f"{key} = {name!r} is not an .npz file name")
        path = self.folder / name
        if not path.is_file():
            raise ChemFLError(f"{state_file} names {name}, which is missing from {self.folder}; {FIX}")
        arrays = _read_arrays(path)
        expected = listed.get(name) if isinstance(listed, dict) else None  # None: a checkpoint from before listings
        if expected is not None and _listing(arrays) != expected:
            raise _damaged(path, f"its arrays differ from those {STATE} lists")
        return arrays


# model.* and lora.* decide the adapter's arrays: the settings a checkpoint must share with its resume.
FIT_PREFIXES = ("model.", "lora.")


def read_run_config(run_dir: Path) -> dict | None:
    """outputs/<run>/config.json (the run config a run was started with), or None when it is
    missing or unreadable. Read it before a resumed run writes its own config there."""
    try:
        data = json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def checkpoint_misfit_message(
    checkpoint_dir: Path,
    config: Mapping[str, Scalar],
    saved_shapes: Mapping[str, tuple[int, ...]] | None = None,
    expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
    saved_config: Mapping[str, Scalar] | None = None,
) -> str:
    """Why a checkpoint's adapter does not fit this run: the model.* / lora.* settings that differ
    from the run's own config.json (outputs/<run>/config.json, beside checkpoint/; pass
    `saved_config` when that file was already replaced), and the first array whose shape differs."""
    checkpoint_dir = Path(checkpoint_dir)
    config_file = checkpoint_dir.parent / "config.json"
    saved = dict(saved_config) if saved_config is not None else read_run_config(checkpoint_dir.parent)
    message = f"the checkpoint in {checkpoint_dir} does not fit this model and LoRA configuration"
    if saved is not None:
        differing = [
            key for key in sorted(config) if key.startswith(FIT_PREFIXES) and key in saved and saved[key] != config[key]
        ]
        if differing:
            then = ", ".join(f"{key} = {saved[key]!r}" for key in differing)
            now = ", ".join(f"{key} = {config[key]!r}" for key in differing)
            message += f": it was saved with {then} ({config_file}), this run has {now}"
        else:
            message += f" ({config_file} shows the same model.* and lora.* settings)"
    else:
        message += f" ({config_file} is missing or unreadable, so the settings it was saved with are unknown)"
    if saved_shapes is not None and expected_shapes is not None:
        names = sorted(set(saved_shapes) | set(expected_shapes))
        for name in names:
            old, new = saved_shapes.get(name), expected_shapes.get(name)
            if old != new:
                old_text = "absent" if old is None else str(tuple(old))
                new_text = "absent" if new is None else str(tuple(new))
                message += f"; e.g. {name} is {old_text} in the checkpoint and {new_text} in this run"
                break
    return message + "; resume with the model.* and lora.* settings the run was started with, or start a fresh run"
