"""`chemfl data build`: BuildSpec.from_config + build_dataset, and the `chemfl data ...` commands."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import pytest

from chemfl import cli, files
from chemfl.data_prep import build as build_module
from chemfl.data_prep import store
from chemfl.data_prep.build import BuildSpec, build_dataset, verify_build
from chemfl.data_prep.schema import FIELDS
from chemfl.data_prep.store import FORMAT
from chemfl.errors import ChemFLError
from tests.conftest import OFFLINE_TASKS, dot_entries, make_config, snapshot, write_smolinstruct_tree

FACILITIES = ["polaris", "aurora", "frontier", "perlmutter"]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def spec_of(overrides: dict | None = None, **knobs) -> BuildSpec:
    return BuildSpec.from_config(make_config(overrides, **knobs))


def chain_rows(n: int, split: bool = False) -> list[dict]:
    """n files-source records about n distinct molecules (straight chains)."""
    rows = []
    for k in range(1, n + 1):
        rows.append(
            {
                "input": f"Formula of <SMILES> {'C' * k} </SMILES> ?",
                "output": f"<MOLFORMULA> C{k}H{2 * k + 2} </MOLFORMULA>",
                "raw_input": "C" * k,
                "raw_output": f"C{k}H{2 * k + 2}",
                "task": "s2f" if k % 2 else "chain-f",
                "input_core_tag_left": "<SMILES>",
                "input_core_tag_right": "</SMILES>",
                "output_core_tag_left": "<MOLFORMULA>",
                "output_core_tag_right": "</MOLFORMULA>",
                **({"split": ["train", "train", "train", "dev", "test"][k % 5]} if split else {}),
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


# --- what a build holds ------------------------------------------------------------------------


def test_build_folder_holds_exactly_the_files_of_its_manifest(small_build):
    manifest = files.read_json(small_build / "manifest.json")
    on_disk = set(snapshot(small_build)) - {"manifest.json"}
    assert on_disk == set(manifest["files"])
    assert {"test.parquet", "validation.parquet"} <= on_disk
    for name in FACILITIES:
        assert {f"partitions/{name}/{f}" for f in ("train.parquet", "validation.parquet", "shard.json")} <= on_disk
    for relative, digest in manifest["files"].items():
        assert sha256(small_build / relative) == digest, relative


def test_manifest_describes_the_build(small_build):
    manifest = files.read_json(small_build / "manifest.json")
    spec = spec_of()
    assert manifest["format"] == FORMAT
    assert manifest["build_id"] == spec.build_id and len(spec.build_id) == 16
    assert manifest["build"] == json.loads(json.dumps(spec.to_json()))
    assert manifest["tasks"] == list(OFFLINE_TASKS)
    assert manifest["facilities"] == FACILITIES
    assert manifest["seed"] == 42 and manifest["scheme"] == "iid"
    assert manifest["source"]["name"] == "offline" and manifest["source"]["molecules"] == 60
    assert set(manifest["versions"]) >= {"rdkit", "chemicals", "pyarrow", "flwr-datasets", "chemfl"}


def test_counts_match_the_parquet_files(small_build):
    manifest = files.read_json(small_build / "manifest.json")
    counts = manifest["counts"]
    total = 0
    for split in ("test", "validation"):
        records = store.read_records(small_build / f"{split}.parquet")
        assert build_module.count_tasks(records) == counts[split]
        assert {r["split"] for r in records} == {split}
        assert all(list(r) == list(FIELDS) for r in records)
        total += len(records)
    train_total = 0
    for partition_id, name in enumerate(FACILITIES):
        shard = files.read_json(small_build / "partitions" / name / "shard.json")
        assert shard["facility"] == name and shard["partition_id"] == partition_id
        assert shard["build_id"] == manifest["build_id"]
        assert counts["partitions"][name]["partition_id"] == partition_id
        for split in ("train", "validation"):
            records = store.read_records(small_build / "partitions" / name / f"{split}.parquet")
            assert build_module.count_tasks(records) == shard["counts"][split] == counts["partitions"][name][split]
            assert {r["split"] for r in records} <= {split}
            if split == "train":
                train_total += len(records)
                assert records
    assert train_total == sum(counts["train"].values())
    assert total + train_total == 60 * 6  # every record of every molecule, once (iid leaks nothing)


# --- determinism -------------------------------------------------------------------------------


def test_same_config_same_bytes_in_another_folder(small_build, tmp_path):
    out = tmp_path / "elsewhere" / "again"
    result = build_dataset(spec_of(), out)
    assert not result.reused
    manifest = files.read_json(small_build / "manifest.json")
    for relative in [*manifest["files"], "manifest.json"]:
        assert (out / relative).read_bytes() == (small_build / relative).read_bytes(), relative
    assert snapshot(out) == snapshot(small_build)


def test_another_seed_gives_other_bytes(small_build, tmp_path):
    result = build_dataset(spec_of(seed=7), tmp_path / "seed7")
    assert result.manifest["build_id"] != files.read_json(small_build / "manifest.json")["build_id"]
    for relative in ("manifest.json", "test.parquet", "validation.parquet", "partitions/polaris/train.parquet"):
        assert (tmp_path / "seed7" / relative).read_bytes() != (small_build / relative).read_bytes(), relative


# --- verify ------------------------------------------------------------------------------------


def test_verify_passes_on_a_build_and_on_a_shard(small_build):
    assert verify_build(small_build) == []
    for name in FACILITIES:
        assert verify_build(small_build / "partitions" / name) == []


def test_verify_fails_after_tampering(build_copy):
    data = bytearray((build_copy / "test.parquet").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (build_copy / "test.parquet").write_bytes(bytes(data))
    assert verify_build(build_copy) == ["test.parquet: sha256 differs from the manifest"]
    (build_copy / "partitions" / "aurora" / "validation.parquet").unlink()
    assert "partitions/aurora/validation.parquet: missing" in verify_build(build_copy)
    assert verify_build(build_copy / "partitions" / "aurora") == ["validation.parquet: missing"]


def test_verify_fails_on_a_tampered_shard(build_copy):
    shard = build_copy / "partitions" / "frontier"
    (shard / "train.parquet").write_bytes((shard / "validation.parquet").read_bytes())
    assert verify_build(shard) == ["train.parquet: sha256 differs from the manifest"]
    assert verify_build(build_copy) == ["partitions/frontier/train.parquet: sha256 differs from the manifest"]


def test_damaged_manifests_are_problems_and_chemfl_errors(build_copy):
    from chemfl.data_prep.shards import load_shard, shard_dir_for

    shard = build_copy / "partitions" / "aurora"
    (shard / "shard.json").write_text('{"files": ')
    [problem] = verify_build(shard)
    assert problem.startswith("shard.json: damaged (not readable JSON")
    with pytest.raises(ChemFLError, match=r"does not match its manifest \(shard.json: damaged"):
        load_shard(shard)
    (shard / "shard.json").write_text(json.dumps({"files": {}}))
    with pytest.raises(ChemFLError, match=r"shard.json is damaged \(no valid facility, partition_id, build_id, train"):
        load_shard(shard)
    (build_copy / "manifest.json").write_text(json.dumps({"format": FORMAT, "build_id": "x", "files": "all"}))
    assert verify_build(build_copy) == ["manifest.json: damaged (no file list)"]
    with pytest.raises(ChemFLError, match="manifest.json is damaged \\(no facility list\\); remove"):
        shard_dir_for(str(build_copy), {"partition-id": 0})
    (build_copy / "manifest.json").write_text("[]")
    before = snapshot(build_copy)
    with pytest.raises(ChemFLError, match=r"manifest.json is damaged \(not a JSON object\); this is no build"):
        build_dataset(spec_of(), build_copy, force=True)
    with pytest.raises(ChemFLError, match=r"manifest.json is damaged \(not a JSON object\); remove"):
        shard_dir_for(str(build_copy), {"partition-id": 0})
    assert snapshot(build_copy) == before


def test_a_partition_id_past_the_facilities_is_an_error(small_build):
    from chemfl.data_prep.shards import shard_dir_for

    assert shard_dir_for(str(small_build), {"partition-id": 3}) == small_build / "partitions" / "perlmutter"
    with pytest.raises(ChemFLError, match="partition-id = 4, but the dataset .* has 4 facilities"):
        shard_dir_for(str(small_build), {"partition-id": 4})


def test_verify_of_a_folder_that_is_no_build(tmp_path):
    [problem] = verify_build(tmp_path)
    assert "neither manifest.json" in problem


# --- rebuilding --------------------------------------------------------------------------------


def test_same_config_reuses_the_build(build_copy):
    before = snapshot(build_copy)
    result = build_dataset(spec_of(), build_copy)
    assert result.reused is True
    assert result.manifest == files.read_json(build_copy / "manifest.json")
    assert snapshot(build_copy) == before


def test_reusing_a_tampered_build_is_refused(build_copy):
    (build_copy / "partitions" / "polaris" / "train.parquet").write_bytes(b"garbage")
    with pytest.raises(ChemFLError, match="do not match its manifest.*--force"):
        build_dataset(spec_of(), build_copy)
    result = build_dataset(spec_of(), build_copy, force=True)
    assert not result.reused and verify_build(build_copy) == []


def test_a_different_build_is_refused_and_leaves_the_old_one_untouched(build_copy):
    before = snapshot(build_copy)
    old_id = files.read_json(build_copy / "manifest.json")["build_id"]
    with pytest.raises(ChemFLError, match=f"already holds a different build \\(build id {old_id}.*--force"):
        build_dataset(spec_of(seed=7), build_copy)
    assert snapshot(build_copy) == before
    assert dot_entries(build_copy.parent) == []


def test_force_replaces_a_different_build(build_copy):
    result = build_dataset(spec_of(seed=7, facilities="polaris,aurora"), build_copy, force=True)
    assert not result.reused
    manifest = files.read_json(build_copy / "manifest.json")
    assert manifest["build_id"] == spec_of(seed=7, facilities="polaris,aurora").build_id
    assert sorted(p.name for p in (build_copy / "partitions").iterdir()) == ["aurora", "polaris"]
    assert verify_build(build_copy) == []
    assert set(snapshot(build_copy)) == {"manifest.json", *manifest["files"]}
    assert dot_entries(build_copy.parent) == []


def test_a_folder_that_is_not_a_build_is_refused(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    for force in (False, True):
        with pytest.raises(ChemFLError, match="is not a ChemFL data build"):
            build_dataset(spec_of(), folder, force=force)
    assert snapshot(folder) == {"notes.txt": b"precious"}
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ChemFLError, match="is not a ChemFL data build"):
        build_dataset(spec_of(), tmp_path / "a-file")
    assert dot_entries(tmp_path) == []


def test_a_folder_with_someone_elses_manifest_is_refused(tmp_path):
    """manifest.json is a common name; a folder whose manifest is not a ChemFL build's is not a build."""
    folder = tmp_path / "other-tool"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"name": "another tool's manifest"}))
    (folder / "notes.txt").write_text("precious")
    before = snapshot(folder)
    with pytest.raises(ChemFLError):
        build_dataset(spec_of(), folder)
    assert snapshot(folder) == before


def test_an_empty_folder_is_built_into(tmp_path):
    (tmp_path / "empty").mkdir()
    result = build_dataset(spec_of(), tmp_path / "empty")
    assert not result.reused and verify_build(tmp_path / "empty") == []


# --- staging -----------------------------------------------------------------------------------


def test_no_staging_folder_is_left_after_success(tmp_path):
    build_dataset(spec_of(), tmp_path / "out")
    build_dataset(spec_of(seed=3), tmp_path / "out", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_no_staging_folder_is_left_after_a_failure_while_partitioning(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(build_module, "partition_indices", broken)
    with pytest.raises(RuntimeError, match="injected"):
        build_dataset(spec_of(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_no_staging_folder_is_left_after_a_failure_while_writing(build_copy, monkeypatch):
    before = snapshot(build_copy)
    real, calls = store.write_records, []

    def flaky(path, records):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full (injected)")
        return real(path, records)

    monkeypatch.setattr(store, "write_records", flaky)
    with pytest.raises(OSError, match="injected"):
        build_dataset(spec_of(seed=9), build_copy, force=True)
    assert len(calls) == 3 and ".partial-" in str(calls[0])  # it failed inside the staging folder
    assert dot_entries(build_copy.parent) == []
    assert snapshot(build_copy) == before  # the old build is untouched


def test_a_failed_swap_keeps_the_old_build_in_place(build_copy, monkeypatch):
    """If moving the finished build into place fails, the previous build must stay where it was."""
    before = snapshot(build_copy)
    real_replace = os.replace

    def failing_replace(src, dst):
        if ".partial-" in str(src):
            raise OSError("rename failed (injected)")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="injected"):
        build_dataset(spec_of(seed=9), build_copy, force=True)
    monkeypatch.undo()
    assert snapshot(build_copy) == before
    assert dot_entries(build_copy.parent) == []


# --- bad input ---------------------------------------------------------------------------------

MANY = ",".join(f"site{i}" for i in range(30))
ALL_TO_POLARIS = ",".join(f"{task}=polaris" for task in OFFLINE_TASKS)

BAD_INPUT = {
    "unknown task": ({"data.tasks": "name_conversion-i2s,no_such_task"}, r"unknown task\(s\) \['no_such_task'\]"),
    "unknown scheme": ({"data.partition-scheme": "round-robin"}, "unknown partition scheme 'round-robin'"),
    "unknown source": ({"data.source": "hub"}, "unknown data.source 'hub'"),
    "alpha zero": ({"data.partition-scheme": "dirichlet", "data.dirichlet-alpha": 0.0}, "dirichlet-alpha = 0.0"),
    "alpha negative": ({"data.partition-scheme": "dirichlet", "data.dirichlet-alpha": -1.0}, "must be > 0"),
    "more partitions than examples": ({"data.max-molecules": 3, "data.facilities": MANY}, "cannot fill 30 partitions"),
    "by-task idle facility": (
        {"data.partition-scheme": "by-task", "data.task-map": ALL_TO_POLARIS},
        r"leaves facility\(ies\) \['aurora', 'frontier', 'perlmutter'\]",
    ),
    "sizes empty partition": (
        {"data.max-molecules": 5, "data.partition-scheme": "sizes", "data.sizes": "1000,1,1,1"},
        "leaves a facility with none",
    ),
    "sizes not numbers": ({"data.partition-scheme": "sizes", "data.sizes": "4,two,1,1"}, "must be numbers"),
    "sizes count": ({"data.partition-scheme": "sizes", "data.sizes": "4,2"}, "gives 2 shares for 4 facilities"),
    "bad task-map entry": (
        {"data.partition-scheme": "by-task", "data.task-map": "name_conversion-i2s"},
        "is not 'task=facility'",
    ),
    "bad facility name": ({"data.facilities": "Polaris,aurora"}, "facility name 'Polaris'"),
    "duplicate facility": ({"data.facilities": "polaris,aurora,polaris"}, "names a facility twice"),
    "no facilities": ({"data.facilities": " , "}, "data.facilities is empty"),
    "test fraction zero": ({"data.test-fraction": 0.0}, "must each be in \\(0, 1\\)"),
    "validation fraction above one": ({"data.validation-fraction": 1.5}, "must each be in \\(0, 1\\)"),
    "fractions add up to one": ({"data.test-fraction": 0.6, "data.validation-fraction": 0.4}, "add up to less than 1"),
    "no molecules": ({"data.max-molecules": 0}, "data.max-molecules = 0 must be positive"),
    "negative cap": ({"data.max-per-task": -1}, "data.max-per-task = -1 must be positive"),
    "files without paths": ({"data.source": "files"}, "needs data.files"),
    "files missing": ({"data.source": "files", "data.files": "/nonexistent/data.jsonl"}, "does not exist"),
    "smolinstruct path missing": (
        {"data.source": "smolinstruct", "data.smolinstruct-path": "/nonexistent/data.zip"},
        "does not exist",
    ),
    "reactions without reactant pairs": (
        {"data.max-molecules": 3, "data.tasks": "forward_synthesis"},
        "hold no reactant pairs for the reaction tasks; raise data.max-molecules",
    ),
    "smolinstruct unknown task": (
        {"data.source": "smolinstruct", "data.tasks": "name_conversion-s2f,logp"},
        r"unknown task\(s\) \['logp'\]",
    ),
}


def attempt_build(tmp_path: Path, overrides: dict) -> Path:
    parent = tmp_path / "builds"
    parent.mkdir()
    build_dataset(BuildSpec.from_config(make_config(overrides)), parent / "out")
    return parent


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_a_clear_error_before_anything_is_written(tmp_path, case):
    overrides, message = BAD_INPUT[case]
    with pytest.raises(ChemFLError, match=message):
        attempt_build(tmp_path, overrides)
    assert list((tmp_path / "builds").iterdir()) == []


def test_files_missing_required_columns(tmp_path):
    rows = [{k: v for k, v in row.items() if k not in ("task", "raw_input")} for row in chain_rows(20)]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(ChemFLError, match=r"lacks required column\(s\) \['raw_input', 'task'\]"):
        attempt_build(tmp_path, {"data.source": "files", "data.files": path})
    assert list((tmp_path / "builds").iterdir()) == []


def test_files_task_map_is_checked_once_the_tasks_are_known(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", chain_rows(40))
    overrides = {
        "data.source": "files",
        "data.files": path,
        "data.facilities": "polaris,aurora",
        "data.partition-scheme": "by-task",
        "data.task-map": "s2f=polaris",
    }
    with pytest.raises(ChemFLError, match=r"no facility for task\(s\) \['chain-f'\]"):
        attempt_build(tmp_path, overrides)
    assert list((tmp_path / "builds").iterdir()) == []


def test_files_requested_task_absent_from_the_files(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", chain_rows(40))
    with pytest.raises(ChemFLError, match=r"no records for task\(s\) \['i2f'\]"):
        attempt_build(tmp_path, {"data.source": "files", "data.files": path, "data.tasks": "s2f,i2f"})
    assert list((tmp_path / "builds").iterdir()) == []


# --- other sources and schemes through the build -----------------------------------------------

REACTION_TASKS = ("forward_synthesis", "retrosynthesis")


def test_all_offline_tasks_are_the_six_molecule_tasks_and_reactions_are_named():
    assert spec_of().tasks == OFFLINE_TASKS
    assert spec_of(tasks="all").tasks == OFFLINE_TASKS
    assert spec_of(tasks="retrosynthesis,name_conversion-s2f").tasks == ("retrosynthesis", "name_conversion-s2f")
    with pytest.raises(ChemFLError) as error:
        spec_of(tasks="forward_prediction")
    message = str(error.value)
    assert "choose from:" in message and all(task in message for task in (*OFFLINE_TASKS, *REACTION_TASKS))
    assert f'"all": {", ".join(OFFLINE_TASKS)})' in message


def test_the_default_build_has_no_reactions(small_build):
    manifest = files.read_json(small_build / "manifest.json")
    assert "reactions" not in manifest["source"]
    assert not set(REACTION_TASKS) & set(manifest["counts"]["train"])


def test_by_task_groups_recipe_gives_each_facility_one_task_group(tmp_path):
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "by-task-groups.toml"
    config = make_config({**cli_config(recipe), "data.max-molecules": 200})
    result = build_dataset(BuildSpec.from_config(config), tmp_path / "build")
    manifest = result.manifest
    tasks = (*OFFLINE_TASKS, *REACTION_TASKS)
    assert tuple(manifest["tasks"]) == tasks and manifest["facilities"] == ["polaris", "aurora", "frontier"]
    groups = {
        "polaris": {task for task in tasks if task.startswith("name_conversion-")},
        "aurora": {task for task in tasks if task.startswith("property_prediction-")},
        "frontier": set(REACTION_TASKS),
    }
    for facility, group in groups.items():
        assert set(manifest["counts"]["partitions"][facility]["train"]) == group, facility
        shard = store.read_records(tmp_path / "build" / "partitions" / facility / "train.parquet")
        assert {record["task"] for record in shard} == group
    assert set(manifest["counts"]["test"]) == set(tasks)
    reactions = sum(manifest["source"]["reactions"].values())
    for task in REACTION_TASKS:
        assert sum(manifest["counts"][split].get(task, 0) for split in ("train", "validation", "test")) == reactions
    assert manifest["leakage_dropped"] == {}


def cli_config(recipe: Path) -> dict:
    from chemfl.data_prep.cli import load_run_config

    return load_run_config(str(recipe))


def test_files_source_build(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", chain_rows(40))
    spec = spec_of({"data.source": "files", "data.files": path, "data.facilities": "polaris,aurora"})
    assert spec.tasks is None
    result = build_dataset(spec, tmp_path / "out")
    manifest = result.manifest
    assert manifest["tasks"] == ["chain-f", "s2f"]
    assert manifest["source"] == {"name": "files", "paths": [path], "inputs": {path: sha256(path)}}
    assert sum(sum(manifest["counts"][s].values()) for s in ("train", "validation", "test")) == 40
    assert verify_build(tmp_path / "out") == []


def test_files_source_with_given_splits_keeps_them(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", chain_rows(40, split=True))
    manifest = build_dataset(
        spec_of({"data.source": "files", "data.files": path, "data.facilities": "polaris,aurora"}), tmp_path / "out"
    ).manifest
    assert [sum(manifest["counts"][s].values()) for s in ("train", "validation", "test")] == [24, 8, 8]


def named_rows(split: str) -> list[dict]:
    """Ethanol asked as S2I, I2S and S2F (SMILES written three ways): one molecule group."""
    rows = []
    for task, raw_input, in_tag, raw_output, out_tag in (
        ("s2i", "CCO", "SMILES", "ethanol", "IUPAC"),
        ("i2s", "Ethanol", "IUPAC", "OCC", "SMILES"),
        ("s2f", "C(C)O", "SMILES", "C2H6O", "MOLFORMULA"),
    ):
        rows.append(
            {
                "input": f"Q <{in_tag}> {raw_input} </{in_tag}>",
                "output": f"<{out_tag}> {raw_output} </{out_tag}>",
                "raw_input": raw_input,
                "raw_output": raw_output,
                "task": task,
                "input_core_tag_left": f"<{in_tag}>",
                "input_core_tag_right": f"</{in_tag}>",
                "output_core_tag_left": f"<{out_tag}>",
                "output_core_tag_right": f"</{out_tag}>",
                "split": split,
            }
        )
    return rows


def built_identities(out: Path) -> dict[str, set[str]]:
    """Every molecule identity of each split, read back from the build's files."""
    from chemfl.data_prep.splits import record_identities

    def identities(paths) -> set[str]:
        return {key for path in paths for record in store.read_records(path) for key in record_identities(record)}

    return {
        "test": identities([out / "test.parquet"]),
        "validation": identities([out / "validation.parquet", *out.glob("partitions/*/validation.parquet")]),
        "train": identities(out.glob("partitions/*/train.parquet")),
    }


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_files_with_train_and_test_but_no_validation_carve_it_from_train(tmp_path, suffix):
    rows = [{**row, "split": "test" if i % 5 == 0 else "train"} for i, row in enumerate(chain_rows(60))]
    rows += named_rows("train") + named_rows("train")[:1]  # ethanol: 4 train records, one group
    path = str(tmp_path / f"data{suffix}")
    if suffix == ".jsonl":
        write_jsonl(Path(path), rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    overrides = {"data.source": "files", "data.files": path, "data.facilities": "polaris,aurora"}
    overrides["data.validation-fraction"] = 0.2
    result = build_dataset(spec_of(overrides), tmp_path / "out")
    manifest = result.manifest
    counts = {split: sum(manifest["counts"][split].values()) for split in ("train", "validation", "test")}
    carved = manifest["validation_carved_from_train"]
    assert carved == {
        "fraction": 0.2,
        "seed": 42,
        "records": counts["validation"],
        "molecule_groups": carved["molecule_groups"],
        "train_records_before": 52,
        "train_records_after": counts["train"],
    }
    assert counts["test"] == 12 and counts["validation"] >= 0.2 * 52 and counts["train"] + counts["validation"] == 52
    assert manifest["leakage_dropped"] == {}
    assert files.read_json(tmp_path / "out" / "manifest.json")["validation_carved_from_train"] == carved
    by_split = built_identities(tmp_path / "out")
    assert by_split["test"] and by_split["validation"] and by_split["train"]
    assert not by_split["test"] & by_split["train"]
    assert not by_split["test"] & by_split["validation"]
    assert not by_split["validation"] & by_split["train"]
    assert verify_build(tmp_path / "out") == []
    again = build_dataset(spec_of({**overrides, "data.seed": 7}), tmp_path / "seed7").manifest
    assert again["validation_carved_from_train"]["seed"] == 7
    validation = store.read_records(tmp_path / "out" / "validation.parquet")
    assert validation != store.read_records(tmp_path / "seed7" / "validation.parquet")


def test_a_test_molecule_in_train_never_reaches_the_carved_validation(tmp_path):
    rows = [{**row, "split": "test" if i % 5 == 0 else "train"} for i, row in enumerate(chain_rows(40))]
    rows += named_rows("test")[:1] + named_rows("train")  # ethanol is a test molecule: its train copies go
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    overrides = {"data.source": "files", "data.files": path, "data.facilities": "polaris,aurora"}
    manifest = build_dataset(spec_of(overrides, validation_fraction=0.3), tmp_path / "out").manifest
    assert manifest["leakage_dropped"] == {"train": 3}
    assert manifest["validation_carved_from_train"]["train_records_before"] == 32
    by_split = built_identities(tmp_path / "out")
    assert "name:ethanol" in by_split["test"]
    assert "name:ethanol" not in by_split["validation"] | by_split["train"]
    assert not by_split["validation"] & by_split["train"]


def test_files_with_splits_but_no_test_records_are_refused(tmp_path):
    rows = [{**row, "split": "train"} for row in chain_rows(20)]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(ChemFLError, match="the data carry splits but no test records"):
        attempt_build(tmp_path, {"data.source": "files", "data.files": path})
    assert list((tmp_path / "builds").iterdir()) == []


def test_builds_that_need_no_carving_say_so(small_build):
    assert files.read_json(small_build / "manifest.json")["validation_carved_from_train"] is None


def test_editing_a_data_file_does_not_silently_reuse_the_stale_build(tmp_path):
    """The build id of a files build holds the paths but not the content: a rebuild after editing the
    data must not report the old build as this config's build."""
    data = tmp_path / "data.jsonl"
    path = write_jsonl(data, chain_rows(40))
    spec = spec_of({"data.source": "files", "data.files": path, "data.facilities": "polaris,aurora"})
    build_dataset(spec, tmp_path / "out")
    rows = chain_rows(40)
    for row in rows:
        row["raw_output"] = row["raw_output"].lower()
    write_jsonl(data, rows)
    try:
        result = build_dataset(
            spec_of({"data.source": "files", "data.files": path, "data.facilities": "polaris,aurora"}), tmp_path / "out"
        )
    except ChemFLError:  # refusing (e.g. "a different build; pass --force") is fine too
        assert (tmp_path / "out" / "manifest.json").is_file()
    else:
        assert not result.reused
        assert result.manifest["source"]["sha256"][path] == sha256(data)


def test_smolinstruct_source_build_keeps_its_splits_and_drops_leaks(tmp_path):
    tree = write_smolinstruct_tree(tmp_path / "tree")
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(tree.rglob("*")):
            if path.is_file():
                handle.write(path, path.relative_to(tree).as_posix())
    overrides = {
        "data.source": "smolinstruct",
        "data.smolinstruct-path": str(archive),
        "data.tasks": "name_conversion-s2f,property_prediction-sider,molecule_captioning",
        "data.facilities": "polaris,aurora",
    }
    manifest = build_dataset(spec_of(overrides), tmp_path / "out").manifest
    # Ethanol is a test molecule (OCC) and a train one (CCO): the train copy goes.
    assert manifest["leakage_dropped"] == {"train": 1}
    assert [sum(manifest["counts"][s].values()) for s in ("train", "validation", "test")] == [10, 4, 6]
    assert manifest["source"] == {
        "name": "smolinstruct",
        "location": str(archive),
        "inputs": {"sha256": sha256(archive)},
    }
    assert "max_molecules" not in manifest["build"] and manifest["build"]["max_per_task"] == 0
    test = store.read_records(tmp_path / "out" / "test.parquet")
    assert {r["target"] for r in test} == {None, "Hepatobiliary disorders", "Vascular disorders"}


def test_smolinstruct_without_its_dev_split_carves_validation_from_train(tmp_path):
    tree = write_smolinstruct_tree(tmp_path / "tree")
    for folder in (tree / "raw" / "dev", tree / "sample" / "instruction_tuning" / "dev"):
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
    overrides = {
        "data.source": "smolinstruct",
        "data.smolinstruct-path": str(tree),
        "data.tasks": "name_conversion-s2f,property_prediction-sider,molecule_captioning",
        "data.facilities": "polaris,aurora",
        "data.validation-fraction": 0.3,
    }
    manifest = build_dataset(spec_of(overrides), tmp_path / "out").manifest
    assert manifest["leakage_dropped"] == {"train": 1}
    carved = manifest["validation_carved_from_train"]
    assert carved["train_records_before"] == 10 and carved["records"] >= 3
    assert [sum(manifest["counts"][s].values()) for s in ("train", "validation", "test")] == [
        10 - carved["records"],
        carved["records"],
        6,
    ]
    by_split = built_identities(tmp_path / "out")
    assert not by_split["test"] & (by_split["train"] | by_split["validation"])
    assert not by_split["validation"] & by_split["train"]


def test_by_task_build_sends_each_task_to_its_facility(tmp_path):
    task_map = {task: ("polaris" if "name_conversion" in task else "aurora") for task in OFFLINE_TASKS}
    overrides = {
        "data.partition-scheme": "by-task",
        "data.facilities": "polaris,aurora",
        "data.task-map": ",".join(f"{t}={f}" for t, f in task_map.items()),
    }
    manifest = build_dataset(spec_of(overrides), tmp_path / "out").manifest
    for facility in ("polaris", "aurora"):
        shard = manifest["counts"]["partitions"][facility]
        assert {task for task in shard["train"]} == {t for t, f in task_map.items() if f == facility}


def test_dirichlet_build(tmp_path):
    manifest = build_dataset(spec_of(partition_scheme="dirichlet", dirichlet_alpha=0.3), tmp_path / "out").manifest
    trains = [sum(manifest["counts"]["partitions"][name]["train"].values()) for name in FACILITIES]
    assert sum(trains) == sum(manifest["counts"]["train"].values()) and all(trains)
    assert manifest["build"]["partition"]["alpha"] == 0.3


def test_build_id_ignores_knobs_the_source_does_not_use():
    assert spec_of(max_per_task=5).build_id == spec_of().build_id
    assert spec_of(files="a.jsonl").build_id == spec_of().build_id
    assert spec_of(max_molecules=61).build_id != spec_of().build_id
    assert spec_of(facilities="polaris,aurora").build_id != spec_of().build_id


# --- the command line --------------------------------------------------------------------------


def test_build_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["data", "build", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--out", "--force", "--run-config", "--max-molecules", "--partition-scheme", "--task-map"):
        assert flag in help_text


def test_cli_build_prints_the_summary_and_reuses(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["data", "build", "--out", str(out), "--max-molecules", "60", "--seed", "5"]) == 0
    err = capsys.readouterr().err
    manifest = files.read_json(out / "manifest.json")
    assert manifest["seed"] == 5 and verify_build(out) == []
    assert "offline data: iid partition over 4 facilities, seed 5" in err
    for word in ("task", "train", "val", "test", *FACILITIES, *OFFLINE_TASKS, "total"):
        assert word in err, word
    total_row = next(line for line in err.splitlines() if "total" in line)
    assert str(sum(manifest["counts"]["train"].values())) in total_row
    assert f"build {manifest['build_id']} built in" in err
    assert cli.main(["data", "build", "--out", str(out), "--max-molecules", "60", "--seed", "5"]) == 0
    assert "already built (verified)" in capsys.readouterr().err


def test_cli_reads_a_recipe_and_flags_win(tmp_path, capsys):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('data.max-molecules = 60\ndata.seed = 7\ndata.facilities = "polaris,aurora"\n')
    out = tmp_path / "out"
    assert cli.main(["data", "build", "--run-config", str(recipe), "--seed", "8", "--out", str(out)]) == 0
    manifest = files.read_json(out / "manifest.json")
    assert manifest["seed"] == 8 and manifest["facilities"] == ["polaris", "aurora"]
    assert manifest["source"]["molecules"] == 60


def test_cli_builds_into_data_path_without_out(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('data.path = "custom/place"\ndata.max-molecules = 60\n')
    assert cli.main(["data", "build", "--run-config", str(recipe)]) == 0
    assert verify_build(tmp_path / "custom" / "place") == []
    assert "custom/place: build" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["custom", "recipe.toml"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tasks", "no_such_task"], "unknown task(s) ['no_such_task']"),
        (["--partition-scheme", "round-robin"], "unknown partition scheme"),
        (["--source", "hub"], "unknown data.source"),
        (["--partition-scheme", "dirichlet", "--dirichlet-alpha", "0"], "dirichlet-alpha"),
        (["--max-molecules", "3", "--facilities", MANY], "cannot fill 30 partitions"),
        (["--test-fraction", "0.7", "--validation-fraction", "0.3"], "add up to less than 1"),
        (["--run-config", "/nonexistent/recipe.toml"], "does not exist"),
    ],
)
def test_cli_bad_input_returns_2_with_an_error_line(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert cli.main(["data", "build", "--out", str(out), "--max-molecules", "60", *argv]) == 2
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if line.startswith("chemfl: error: ")]
    assert message in line
    assert list(tmp_path.iterdir()) == []


def test_cli_recipe_with_an_unknown_key(tmp_path, capsys):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("data.max_molecules = 60\n")
    assert cli.main(["data", "build", "--run-config", str(recipe), "--out", str(tmp_path / "out")]) == 2
    assert "unknown config key(s) ['data.max_molecules']" in capsys.readouterr().err


def test_cli_refuses_a_different_build_without_force(build_copy, capsys):
    before = snapshot(build_copy)
    assert cli.main(["data", "build", "--out", str(build_copy), "--max-molecules", "60", "--seed", "1"]) == 2
    assert "--force" in capsys.readouterr().err
    assert snapshot(build_copy) == before
    assert cli.main(["data", "build", "--out", str(build_copy), "--max-molecules", "60", "--seed", "1", "--force"]) == 0
    assert files.read_json(build_copy / "manifest.json")["seed"] == 1


def test_cli_verify(build_copy, capsys):
    assert cli.main(["data", "verify", str(build_copy)]) == 0
    assert "every file matches its manifest" in capsys.readouterr().out
    assert cli.main(["data", "verify", str(build_copy / "partitions" / "polaris")]) == 0
    (build_copy / "partitions" / "polaris" / "train.parquet").write_bytes(b"x")
    capsys.readouterr()
    assert cli.main(["data", "verify", str(build_copy)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("chemfl: error: ") and "partitions/polaris/train.parquet: sha256 differs" in err
    assert str(build_copy) in err
    assert cli.main(["data", "verify", str(build_copy / "partitions" / "polaris")]) == 2


def test_cli_baselines_prints_a_table(small_build, capsys):
    assert cli.main(["data", "baselines", str(small_build)]) == 0
    out = capsys.readouterr().out
    assert "Trivial baselines on the test set (36 records)" in out
    for word in ("copy-input", "most-common", "macro mean", "rmse"):
        assert word in out, word
    assert sum(task in out for task in OFFLINE_TASKS) == len(OFFLINE_TASKS)


def test_cli_baselines_needs_a_build(tmp_path, capsys):
    assert cli.main(["data", "baselines", str(tmp_path)]) == 2
    assert "has no test.parquet" in capsys.readouterr().err


def test_most_common_baseline_answers_the_commonest_training_output(small_build):
    from chemfl.data_prep.baselines import baseline_scores

    test = store.read_records(small_build / "test.parquet")
    train = [r for shard in sorted(small_build.glob("partitions/*/train.parquet")) for r in store.read_records(shard)]
    ro3_train = [r["raw_output"] for r in train if r["task"] == "property_prediction-ro3"]
    commonest = max(("Yes", "No"), key=ro3_train.count)
    ro3_test = [r["raw_output"] for r in test if r["task"] == "property_prediction-ro3"]
    scores = baseline_scores(test, train)
    assert scores["most-common"]["tasks"]["property_prediction-ro3"]["accuracy"] == pytest.approx(
        ro3_test.count(commonest) / len(ro3_test)
    )
    # Copying a SMILES where a number is expected is never a valid number.
    assert scores["copy-input"]["tasks"]["property_prediction-logp"]["invalid_rate"] == 1.0
