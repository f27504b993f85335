"""Local JSONL / JSON / parquet files in SMolInstruct's schema: what a lab with its own data has."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
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
    """The records of one data file; a file that cannot be read as its suffix says is a ChemFLError."""
    try:
        if path.suffix == ".jsonl":
            rows = []
            with path.open(encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except ValueError as error:
                            raise ChemFLError(
                                f"data file {path}, line {number}: not a JSON record ({error}); "
                                "a .jsonl file holds one JSON object per line"
                            ) from None
        elif path.suffix == ".json":
            try:
                rows = json.loads(path.read_text(encoding="utf-8"))
            except UnicodeDecodeError:
                raise
            except ValueError as error:
                raise ChemFLError(f"data file {path} is not valid JSON ({error})") from None
            if not isinstance(rows, list):
                raise ChemFLError(f"{path}: a .json data file must hold a list of records")
        else:
            try:
                rows = pq.read_table(path).to_pylist()
            except (pa.ArrowException, OSError) as error:
                raise ChemFLError(f"data file {path} is not a readable parquet file ({error})") from None
    except UnicodeDecodeError as error:
        raise ChemFLError(f"data file {path} is not UTF-8 text ({error})") from None
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise ChemFLError(
                f"data file {path}: record {number} is {type(row).__name__} {row!r:.40}, not an object with "
                f"the fields {', '.join(REQUIRED_FIELDS)}"
            )
    return rows


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
