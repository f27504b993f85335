"""A data build on disk: parquet records, manifests and their sha256 checks."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from chemfl.data_prep.schema import ARROW_SCHEMA, FIELDS
from chemfl.errors import ChemFLError
from chemfl.files import file_sha256

MANIFEST = "manifest.json"
FORMAT = "chemfl-data/1"  # manifest format tag
SHARD_MANIFEST = "shard.json"


def write_records(path: Path, records: list[dict]) -> str:
    """Write `records` as parquet (no timestamps: same records, same bytes); return its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([{f: r[f] for f in FIELDS} for r in records], schema=ARROW_SCHEMA)
    pq.write_table(table, path, compression="zstd")
    return file_sha256(path)


def read_records(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def write_json(path: Path, data: dict) -> str:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return file_sha256(path)


def _json_object(path: Path) -> dict:
    """The JSON object in `path`; ValueError(why) when it is unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"not readable JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def read_manifest(path: Path, fix: str) -> dict:
    """A manifest.json or shard.json; a damaged one is a ChemFLError naming it and `fix`."""
    try:
        return _json_object(path)
    except ValueError as error:
        raise ChemFLError(f"{path} is damaged ({error}); {fix}") from None


def manifest_problems(folder: Path, name: str) -> list[str]:
    """Problems with `folder` measured against its manifest `name` (manifest.json or shard.json)."""
    try:
        manifest = _json_object(Path(folder) / name)
    except ValueError as error:
        return [f"{name}: damaged ({error})"]
    expected = manifest.get("files")
    if not isinstance(expected, dict) or not all(isinstance(v, str) for v in expected.values()):
        return [f"{name}: damaged (no file list)"]
    return check_files(Path(folder), expected)


def check_files(folder: Path, expected: dict[str, str]) -> list[str]:
    """Problems found comparing `folder`'s files with their expected sha256 (empty: all good)."""
    problems = []
    for relative, digest in sorted(expected.items()):
        path = folder / relative
        if not path.is_file():
            problems.append(f"{relative}: missing")
        elif file_sha256(path) != digest:
            problems.append(f"{relative}: sha256 differs from the manifest")
    return problems


def existing_build_id(target: Path) -> str | None:
    """The build id of the build at `target`; None when there is no folder (or an empty one)."""
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        return None
    manifest = target / MANIFEST
    if not target.is_dir() or not manifest.is_file():
        raise ChemFLError(
            f"{target} exists and is not a ChemFL data build (no {MANIFEST}); choose another output folder or remove it"
        )
    data = read_manifest(
        manifest, f"this is no build to reuse or replace: remove {target}, or choose another output folder"
    )
    if data.get("format") != FORMAT or not isinstance(data.get("build_id"), str):
        raise ChemFLError(
            f"{target} holds a {MANIFEST} that is not a ChemFL data manifest; choose another output folder or remove it"
        )
    return data["build_id"]
