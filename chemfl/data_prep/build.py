"""`chemfl data build`: source -> records -> leakage-free splits -> facility partitions -> files.

Output folder:
  manifest.json                      source, seed, scheme, counts, leakage drops, validation carved
                                     from train (if any), sha256 of every file
  test.parquet, validation.parquet   held out; the server evaluates on test
  partitions/<facility>/             what one facility receives
      train.parquet, validation.parquet, shard.json (its counts and sha256s)
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

from chemfl import __version__, files
from chemfl.config import Scalar, split_list
from chemfl.data_prep import store
from chemfl.data_prep.partitions import PartitionSpec, parse_task_map, partition_indices
from chemfl.data_prep.sources.files import load_files
from chemfl.data_prep.sources.offline import load_offline, pubchem_table_path
from chemfl.data_prep.sources.smolinstruct import HUB_FILE, HUB_REPO, SMOLINSTRUCT_TASKS, load_smolinstruct
from chemfl.data_prep.splits import split_records
from chemfl.data_prep.tasks import DEFAULT_OFFLINE_TASKS, OFFLINE_TASKS_BY_NAME
from chemfl.errors import ChemFLError

SOURCES = ("offline", "smolinstruct", "files")
KNOWN_TASKS = {"offline": tuple(OFFLINE_TASKS_BY_NAME), "smolinstruct": SMOLINSTRUCT_TASKS}
# What data.tasks = "all" builds. Offline reactions are opt-in, so "all" builds what it always has.
ALL_TASKS = {"offline": DEFAULT_OFFLINE_TASKS, "smolinstruct": SMOLINSTRUCT_TASKS}


@dataclass(frozen=True)
class BuildSpec:
    """Everything that decides a build's content; its hash is the build id."""

    source: str
    tasks: tuple[str, ...] | None  # None: every task the source has
    max_molecules: int
    max_per_task: int
    seed: int
    test_fraction: float
    validation_fraction: float
    files: tuple[str, ...]
    smolinstruct_path: str
    partition: PartitionSpec

    @classmethod
    def from_config(cls, config: Mapping[str, Scalar]) -> BuildSpec:
        """Read and check the data.* knobs; raises ChemFLError before any work is done."""
        source = str(config["data.source"])
        if source not in SOURCES:
            raise ChemFLError(f"unknown data.source {source!r}; use one of {', '.join(SOURCES)}")
        requested = split_list(str(config["data.tasks"]))
        tasks = None if requested in ([], ["all"]) else tuple(requested)
        if source in KNOWN_TASKS:
            known = KNOWN_TASKS[source]
            unknown = sorted(set(tasks or ()) - set(known))
            if unknown:
                raise ChemFLError(
                    f"unknown task(s) {unknown} for data.source = {source!r}; "
                    f'choose from: {", ".join(known)} (or "all": {", ".join(ALL_TASKS[source])})'
                )
            tasks = tasks or ALL_TASKS[source]
        test_fraction = float(config["data.test-fraction"])
        validation_fraction = float(config["data.validation-fraction"])
        if not (0 < test_fraction < 1 and 0 < validation_fraction < 1 and test_fraction + validation_fraction < 1):
            raise ChemFLError(
                f"data.test-fraction = {test_fraction} and data.validation-fraction = "
                f"{validation_fraction} must each be in (0, 1) and add up to less than 1"
            )
        for key in ("data.max-molecules", "data.max-per-task"):
            if int(config[key]) < 0 or (key == "data.max-molecules" and int(config[key]) == 0):
                raise ChemFLError(f"{key} = {config[key]} must be positive")
        try:
            sizes = tuple(float(share) for share in split_list(str(config["data.sizes"])))
        except ValueError as error:
            raise ChemFLError(f'data.sizes = {config["data.sizes"]!r} must be numbers like "4,2,1,1"') from error
        partition = PartitionSpec(
            scheme=str(config["data.partition-scheme"]),
            facilities=tuple(split_list(str(config["data.facilities"]))),
            seed=int(config["data.seed"]),
            alpha=float(config["data.dirichlet-alpha"]),
            sizes=sizes,
            task_map=parse_task_map(str(config["data.task-map"])),
        )
        if tasks is not None:  # files: the task list is known only after reading them
            partition.validate(tasks)
        return cls(
            source=source,
            tasks=tasks,
            max_molecules=int(config["data.max-molecules"]),
            max_per_task=int(config["data.max-per-task"]),
            seed=int(config["data.seed"]),
            test_fraction=test_fraction,
            validation_fraction=validation_fraction,
            files=tuple(split_list(str(config["data.files"]))),
            smolinstruct_path=str(config["data.smolinstruct-path"]),
            partition=partition,
        )

    def to_json(self) -> dict:
        data = asdict(self)
        data["partition"]["task_map"] = dict(sorted(self.partition.task_map.items()))
        # Knobs the chosen source ignores do not change the content, so they stay out of the id.
        if self.source != "offline":
            data.pop("max_molecules")
        else:
            data.pop("max_per_task")
        if self.source != "files":
            data.pop("files")
        if self.source != "smolinstruct":
            data.pop("smolinstruct_path")
        return data

    @property
    def build_id(self) -> str:
        """The id a build of this spec gets now (spec and input contents)."""
        return compute_build_id(self, self.input_fingerprint())

    def input_fingerprint(self) -> dict:
        """What the source reads, by content: a changed input file means a different build."""
        if self.source == "offline":
            return {"pubchem_table_sha256": files.file_sha256(pubchem_table_path())}
        if self.source == "files":
            for path in self.files:
                if not Path(path).expanduser().is_file():
                    raise ChemFLError(f"data file {path} does not exist")
            return {path: files.file_sha256(Path(path).expanduser()) for path in self.files}
        location = Path(self.smolinstruct_path).expanduser() if self.smolinstruct_path else None
        if location is None:
            return {"hub": f"{HUB_REPO}/{HUB_FILE}"}
        if location.is_file():
            return {"sha256": files.file_sha256(location)}
        if location.is_dir():  # a large extracted tree: sizes and times stand in for contents
            listing = sorted(
                (str(p.relative_to(location)), p.stat().st_size, p.stat().st_mtime_ns)
                for p in location.rglob("*")
                if p.is_file()
            )
            return {"listing_sha256": hashlib.sha256(json.dumps(listing).encode()).hexdigest()}
        raise ChemFLError(f"data.smolinstruct-path {location} does not exist")


def compute_build_id(spec: BuildSpec, inputs: dict) -> str:
    canonical = json.dumps({"spec": spec.to_json(), "inputs": inputs}, sort_keys=True).encode()
    return hashlib.sha256(canonical).hexdigest()[:16]


@dataclass
class BuildResult:
    manifest: dict
    seconds: float
    reused: bool  # True: the folder already held this exact build (verified, not rebuilt)


Step = Callable[[str, int], Callable[[], None]]  # (description, total) -> advance-by-one


def _no_progress(description: str, total: int) -> Callable[[], None]:
    return lambda: None


def build_dataset(spec: BuildSpec, out_dir: Path, force: bool = False, step: Step = _no_progress) -> BuildResult:
    started = time.perf_counter()
    out_dir = Path(out_dir)
    existing = store.existing_build_id(out_dir)
    inputs = spec.input_fingerprint()  # hashed once: the offline table is ~30 MB
    build_id = compute_build_id(spec, inputs)
    if existing == build_id and not force:
        problems = verify_build(out_dir)
        if problems:
            raise ChemFLError(
                f"{out_dir} holds this build but its files do not match its manifest "
                f"({'; '.join(problems[:3])}); rebuild with --force"
            )
        return BuildResult(files.read_json(out_dir / store.MANIFEST), time.perf_counter() - started, True)
    if existing is not None and not force:
        raise ChemFLError(
            f"{out_dir} already holds a different build (build id {existing}, this one is "
            f"{build_id}); pass --force to replace it, or choose another output folder"
        )

    records, source_info = _load(spec, step)
    source_info["inputs"] = inputs
    tasks = spec.tasks or tuple(sorted({record["task"] for record in records}))
    _check_tasks(spec, records, tasks)
    records, leakage_dropped, carved = split_records(
        records, spec.test_fraction, spec.validation_fraction, spec.seed, assigned_by_source=spec.source == "offline"
    )
    by_split = {split: [r for r in records if r["split"] == split] for split in ("train", "validation", "test")}
    # Train and validation are partitioned together, so each facility's validation set follows
    # its own task mix (dirichlet, by-task) rather than the global one.
    pool = by_split["train"] + by_split["validation"]
    parts = partition_indices([r["task"] for r in pool], spec.partition)
    for name, rows in zip(spec.partition.facilities, parts, strict=False):
        if not any(pool[i]["split"] == "train" for i in rows):
            raise ChemFLError(f"facility {name} received no training examples; use more data or fewer facilities")

    staging = files.staging_dir(out_dir)
    try:
        splitting = {"leakage_dropped": dict(sorted(leakage_dropped.items())), "validation_carved_from_train": carved}
        manifest = _write(staging, spec, build_id, tasks, source_info, by_split, pool, parts, splitting, step)
        files.replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return BuildResult(manifest, time.perf_counter() - started, False)


def _load(spec: BuildSpec, step: Step) -> tuple[list[dict], dict]:
    if spec.source == "offline":
        advance = step("molecules from PubChem", spec.max_molecules)
        return load_offline(
            spec.tasks, spec.max_molecules, spec.seed, spec.test_fraction, spec.validation_fraction, advance
        )
    if spec.source == "smolinstruct":
        step("reading SMolInstruct", 1)
        return load_smolinstruct(spec.smolinstruct_path, spec.tasks, spec.max_per_task)
    step("reading data files", 1)
    records, info = load_files(spec.files, spec.tasks, spec.max_per_task)
    return records, info


def _check_tasks(spec: BuildSpec, records: list[dict], tasks: tuple[str, ...]) -> None:
    present = {record["task"] for record in records}
    absent = [task for task in tasks if task not in present]
    if absent:
        raise ChemFLError(f"the {spec.source} source has no records for task(s) {absent}")
    if spec.tasks is None:  # files: validate the partition spec now that the tasks are known
        spec.partition.validate(tasks)


def count_tasks(records: list[dict]) -> dict[str, int]:
    return dict(sorted(Counter(record["task"] for record in records).items()))


def _write(staging, spec, build_id, tasks, source_info, by_split, pool, parts, splitting, step) -> dict:
    advance = step("writing files", 2 + len(parts))
    files: dict[str, str] = {}
    for split in ("test", "validation"):
        files[f"{split}.parquet"] = store.write_records(staging / f"{split}.parquet", by_split[split])
        advance()
    partitions: dict[str, dict] = {}
    for partition_id, (name, rows) in enumerate(zip(spec.partition.facilities, parts, strict=False)):
        shard_dir = staging / "partitions" / name
        shard_files, shard_counts = {}, {}
        for split in ("train", "validation"):
            shard_records = [pool[i] for i in rows if pool[i]["split"] == split]
            shard_files[f"{split}.parquet"] = store.write_records(shard_dir / f"{split}.parquet", shard_records)
            shard_counts[split] = count_tasks(shard_records)
        shard = {
            "build_id": build_id,
            "facility": name,
            "partition_id": partition_id,
            "counts": shard_counts,
            "files": shard_files,
        }
        shard_files[store.SHARD_MANIFEST] = store.write_json(shard_dir / store.SHARD_MANIFEST, shard)
        files.update({f"partitions/{name}/{rel}": digest for rel, digest in shard_files.items()})
        partitions[name] = {"partition_id": partition_id, **shard_counts}
        advance()
    manifest = {
        "format": store.FORMAT,
        "build_id": build_id,
        "build": spec.to_json(),
        "source": source_info,
        "seed": spec.seed,
        "scheme": spec.partition.scheme,
        "tasks": list(tasks),
        "facilities": list(spec.partition.facilities),
        "counts": {
            "train": count_tasks(by_split["train"]),
            "validation": count_tasks(by_split["validation"]),
            "test": count_tasks(by_split["test"]),
            "partitions": partitions,
        },
        # leakage_dropped: records dropped per split for sharing a molecule with a more held-out split;
        # validation_carved_from_train: null, or what was carved when the source gave no validation.
        **splitting,
        "files": files,
        "versions": {name: version(name) for name in ("rdkit", "chemicals", "pyarrow", "flwr-datasets")}
        | {"chemfl": __version__},
    }
    store.write_json(staging / store.MANIFEST, manifest)
    return manifest


def verify_build(folder: Path) -> list[str]:
    """Problems with a build folder or a single facility shard (empty list: it matches its manifest)."""
    folder = Path(folder)
    if (folder / store.MANIFEST).is_file():
        return store.manifest_problems(folder, store.MANIFEST)
    if (folder / store.SHARD_MANIFEST).is_file():
        return store.manifest_problems(folder, store.SHARD_MANIFEST)
    return [f"{folder} has neither {store.MANIFEST} (a build) nor {store.SHARD_MANIFEST} (a facility shard)"]
