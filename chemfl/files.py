"""Generic file helpers: digests and writes that readers never see half-done."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
