"""Local JSONL / JSON / parquet files in SMolInstruct's schema: what a lab with its own data has."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import pyarrow.parquet as pq

from chemfl.data_prep.schema import FIELDS, REQUIRED_FIELDS
from chemfl.errors import ChemFLError

# Names labs use for the validation split.
SPLIT_ALIASES = {
    "train": "train",
    "validation": "validation",
    "valid": "validation",
    "dev": "validation",
    "val": "validation",
    "test": "test",
}
SUFFIXES = (".jsonl", ".json", ".parquet")


def _rows(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise ChemFLError(f"{path}: a .json data file must hold a list of records")
        return data
    return pq.read_table(path).to_pylist()


def load_files(paths: Sequence[str], tasks: Sequence[str] | None, max_per_task: int) -> tuple[list[dict], dict]:
    """Records from `paths`, keeping `tasks` (None: all), at most `max_per_task` per task and split."""
    if not paths:
        raise ChemFLError('data.source = "files" needs data.files = "a.jsonl,b.parquet,..."')
    records: list[dict] = []
    for name in paths:
        path = Path(name).expanduser()
        if not path.is_file():
            raise ChemFLError(f"data file {path} does not exist")
        if path.suffix not in SUFFIXES:
            raise ChemFLError(f"data file {path}: use one of {', '.join(SUFFIXES)}")
        rows = _rows(path)
        if not rows:
            raise ChemFLError(f"data file {path} holds no records")
        columns = set().union(*(row.keys() for row in rows))
        missing = [field for field in REQUIRED_FIELDS if field not in columns]
        if missing:
            raise ChemFLError(
                f"data file {path} lacks required column(s) {missing}; SMolInstruct records need "
                f"{list(REQUIRED_FIELDS)} (split and target are optional)"
            )
        for row in rows:
            records.append({field: _text(row.get(field)) for field in FIELDS})
    for record in records:
        split = record["split"]
        if split is not None:
            if split not in SPLIT_ALIASES:
                raise ChemFLError(f"unknown split {split!r} in data files; use train, validation or test")
            record["split"] = SPLIT_ALIASES[split]
    if tasks is not None:
        records = [record for record in records if record["task"] in set(tasks)]
    if max_per_task > 0:
        kept: defaultdict[tuple, int] = defaultdict(int)
        capped = []
        for record in records:
            key = (record["task"], record["split"])
            if kept[key] < max_per_task:
                kept[key] += 1
                capped.append(record)
        records = capped
    return records, {"name": "files", "paths": list(paths)}


def _text(value: object) -> str | None:
    return None if value is None else str(value)
