"""What the apps read: a facility's shard (ClientApp) and the held-out test set (ServerApp)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from chemfl import files
from chemfl.data_prep import store
from chemfl.data_prep.build import verify_build
from chemfl.errors import ChemFLError
from chemfl.protocol import NodeConfig


@dataclass(frozen=True)
class Shard:
    facility: str
    partition_id: int
    build_id: str
    train: list[dict]
    validation: list[dict]


def shard_dir_for(data_path: str, node_config: dict) -> Path:
    """Deployment: node config `data-path` is the shard folder. Simulation: the partition-id-th
    facility of the build at `data_path`."""
    if NodeConfig.DATA_PATH in node_config:
        return Path(str(node_config[NodeConfig.DATA_PATH])).expanduser()
    if "partition-id" not in node_config:
        raise ChemFLError(
            "this SuperNode has neither a data-path nor a partition-id in its node config; "
            "start it with --node-config 'data-path=/path/to/partitions/<facility>'"
        )
    manifest_path = Path(data_path) / store.MANIFEST
    if not manifest_path.is_file():
        raise ChemFLError(f"no dataset at data.path = {data_path}; run: chemfl data build --run-config <recipe>")
    rebuild = f"remove {data_path} and build it again: chemfl data build --run-config <recipe>"
    manifest = store.read_manifest(manifest_path, rebuild)
    facilities = manifest.get("facilities")
    if not isinstance(facilities, list) or not facilities or not all(isinstance(f, str) for f in facilities):
        raise ChemFLError(f"{manifest_path} is damaged (no facility list); {rebuild}")
    partition_id, num_partitions = (
        int(node_config["partition-id"]),
        int(node_config.get("num-partitions", len(facilities))),
    )
    if num_partitions != len(facilities):
        raise ChemFLError(
            f"the simulation runs {num_partitions} SuperNodes but the dataset at {data_path} has "
            f"{len(facilities)} facilities ({', '.join(facilities)}); set num-supernodes = {len(facilities)}"
        )
    if not 0 <= partition_id < len(facilities):
        raise ChemFLError(
            f"partition-id = {partition_id}, but the dataset at {data_path} has {len(facilities)} facilities "
            f"(partition ids 0-{len(facilities) - 1})"
        )
    return Path(data_path) / "partitions" / facilities[partition_id]


def load_shard(folder: Path) -> Shard:
    """A facility's shard, checked against its shard.json before any record is used."""
    if not (folder / store.SHARD_MANIFEST).is_file():
        raise ChemFLError(
            f"{folder} is not a ChemFL shard (no {store.SHARD_MANIFEST}); point data-path at "
            "partitions/<facility> of a build"
        )
    problems = verify_build(folder)
    if problems:
        raise ChemFLError(
            f"shard {folder} does not match its manifest ({'; '.join(problems)}); copy it again from the build"
        )
    manifest = store.read_manifest(folder / store.SHARD_MANIFEST, "copy the shard again from the build")
    fields = {"facility": str, "partition_id": int, "build_id": str}
    wrong = [key for key, kind in fields.items() if not isinstance(manifest.get(key), kind)]
    listed = manifest.get("files", {})
    wrong += [name for name in ("train.parquet", "validation.parquet") if name not in listed]
    if wrong:
        raise ChemFLError(
            f"{folder / store.SHARD_MANIFEST} is damaged (no valid {', '.join(wrong)}); "
            "copy the shard again from the build"
        )
    return Shard(
        manifest["facility"],
        manifest["partition_id"],
        manifest["build_id"],
        store.read_records(folder / "train.parquet"),
        store.read_records(folder / "validation.parquet"),
    )


def load_test_set(shard_folder: Path) -> list[dict]:
    """The held-out test set for a facility that evaluates the global adapter (`eval.at`): a
    `test.parquet` copied beside the shard (deployment), else the build's own, two folders up
    (`data.path/partitions/<facility>` in simulation), checked against the build manifest."""
    beside = shard_folder / "test.parquet"
    if beside.is_file():
        return store.read_records(beside)
    build = shard_folder.parent.parent
    manifest_path = build / store.MANIFEST
    if not manifest_path.is_file() or not (build / "test.parquet").is_file():
        raise ChemFLError(
            f"eval.at names this facility but there is no test set at {beside} or {build / 'test.parquet'}; "
            "copy the build's test.parquet next to the shard"
        )
    expected = files.read_json(manifest_path).get("files", {}).get("test.parquet")
    if expected is not None and files.file_sha256(build / "test.parquet") != expected:
        raise ChemFLError(f"{build / 'test.parquet'} does not match the build manifest; copy it again")
    return store.read_records(build / "test.parquet")


def parse_slice(setting: str) -> tuple[int, int]:
    """`"i/n"`: records i, i+n, i+2n, ... of a facility's training shard (node config `data-slice`,
    `chemfl trainer --data-slice`), so n consumers of one shard never train on the same examples."""
    index, _, count = str(setting).partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise ChemFLError(f"data-slice = {setting!r} must be 'i/n' with 0 <= i < n, e.g. data-slice='1/4'")
    return i, n


def load_slice(folder: Path, data_slice: tuple[int, int] | None) -> Shard:
    """The shard, checked against its manifest; with (i, n) its training records i, i+n, ..."""
    shard = load_shard(folder)
    if data_slice is None:
        return shard
    index, count = data_slice
    return replace(shard, train=shard.train[index::count])
