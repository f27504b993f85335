"""Files: parquet shards, sha256 digests, manifests, and atomic replacement of a build folder."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from chemfl.data_prep.schema import ARROW_SCHEMA, FIELDS
from chemfl.errors import ChemFLError

MANIFEST = "manifest.json"
FORMAT = "chemfl-data/1"  # manifest format tag
SHARD_MANIFEST = "shard.json"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def write_file_atomically(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """Write `data` to a temporary file beside `path` with `mode`, flush it to disk, then rename it
    over `path`: readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, mode)
        with os.fdopen(handle, "wb") as stream:
            stream.write(data.encode("utf-8") if isinstance(data, str) else data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


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


def staging_dir(target: Path) -> Path:
    """A fresh sibling of `target` to build in; renamed over `target` once complete."""
    staging = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def replace_dir(staging: Path, target: Path) -> None:
    """Move a finished folder into place; the old one is put back if the swap fails, and
    removed only once the new one is in place."""
    previous = target.parent / f".{target.name}.previous-{os.getpid()}"
    had_previous = target.exists()
    if had_previous:
        os.replace(target, previous)
    try:
        os.replace(staging, target)
    except BaseException:
        if had_previous:
            os.replace(previous, target)
        raise
    shutil.rmtree(previous, ignore_errors=True)


def existing_build_id(target: Path) -> str | None:
    """The build id of the build at `target`; None when there is no folder (or an empty one)."""
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        return None
    manifest = target / MANIFEST
    if not target.is_dir() or not manifest.is_file():
        raise ChemFLError(
            f"{target} exists and is not a ChemFL data build (no {MANIFEST}); choose another output folder or remove it"
        )
    data = read_json(manifest)
    if data.get("format") != FORMAT or "build_id" not in data:
        raise ChemFLError(
            f"{target} holds a {MANIFEST} that is not a ChemFL data manifest; choose another output folder or remove it"
        )
    return data["build_id"]
