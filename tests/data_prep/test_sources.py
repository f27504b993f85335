"""Where records come from: SMolInstruct's data files, local files, and the offline PubChem set."""

from __future__ import annotations

import json
import shutil
import zipfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rdkit import Chem
from rdkit.Chem import Crippen, Descriptors, Lipinski, rdMolDescriptors

from chemfl.data_prep.schema import FIELDS, REQUIRED_FIELDS
from chemfl.data_prep.sources.files import load_files
from chemfl.data_prep.sources.offline import load_offline
from chemfl.data_prep.sources.smolinstruct import load_smolinstruct
from chemfl.errors import ChemFLError
from tests.conftest import OFFLINE_TASKS, SMOL_TREE, write_smolinstruct_tree

SMOL_TASKS = list(SMOL_TREE)
SPLIT_OF_FOLDER = {"train": "train", "dev": "validation", "test": "test"}


def upstream_records(root: Path, tasks, use_first: int | None = None) -> list[dict]:
    """What osunlp/SMolInstruct's loading script (_generate_instruction_examples) yields from `root`,
    with its split folder named the ChemFL way (dev -> validation)."""
    records = []
    for task in tasks:
        for folder in ("train", "dev", "test"):
            sample_record = json.loads((root / "sample" / "instruction_tuning" / folder / f"{task}.json").read_text())
            templates = json.loads((root / "template" / sample_record["template_name"] / f"{task}.json").read_text())
            data = [json.loads(line) for line in (root / "raw" / folder / f"{task}.jsonl").read_text().splitlines()]
            core_tags = json.loads((root / "core_tag" / f"{task}.json").read_text())
            in_left, in_right = core_tags["input"]
            out_left, out_right = core_tags["output"]
            samples = sample_record["samples"]
            for sample in samples if use_first is None else samples[:use_first]:
                item = data[sample["idx"]]
                template = templates[sample["template_id"]]
                input_data = item["input"]
                input_str = f"{in_left} {input_data} {in_right}" if in_left is not None else input_data
                output_data = item["output"]
                target = None
                if isinstance(output_data, dict):
                    target = sample["target"]
                    output_data = output_data[target]
                output_str = f"{out_left} {output_data} {out_right}" if out_left is not None else output_data
                records.append(
                    {
                        "input": template["input"].replace("<INPUT>", input_str),
                        "output": template["output"].replace("<OUTPUT>", output_str),
                        "raw_input": input_data,
                        "raw_output": output_data,
                        "task": task,
                        "split": SPLIT_OF_FOLDER[folder],
                        "input_core_tag_left": in_left,
                        "input_core_tag_right": in_right,
                        "output_core_tag_left": out_left,
                        "output_core_tag_right": out_right,
                        "target": target,
                    }
                )
    return records


def by_task_and_split(records):
    grouped: dict[tuple, list] = {}
    for record in records:
        grouped.setdefault((record["task"], record["split"]), []).append(record)
    return grouped


def zip_at_top(tree: Path, archive: Path) -> Path:
    """Files only, no directory entries, the tree at the top of the zip."""
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(tree.rglob("*")):
            if path.is_file():
                handle.write(path, path.relative_to(tree).as_posix())
    return archive


def zip_one_folder_down(tree: Path, archive: Path) -> Path:
    """With directory entries (as `zip -r` writes them), the tree under data/ in the zip."""
    base = shutil.make_archive(str(archive.with_suffix("")), "zip", root_dir=tree.parent, base_dir=tree.name)
    return Path(base)


# --- SMolInstruct ------------------------------------------------------------------------------


def test_smolinstruct_folder_gives_the_records_the_upstream_script_builds(smolinstruct_tree):
    records, info = load_smolinstruct(str(smolinstruct_tree), SMOL_TASKS, 0)
    expected = upstream_records(smolinstruct_tree, SMOL_TASKS)
    assert by_task_and_split(records) == by_task_and_split(expected)
    assert len(records) == sum(len(s) for spec in SMOL_TREE.values() for s in spec["samples"].values())
    assert all(list(record) == list(FIELDS) for record in records)
    assert info == {"name": "smolinstruct", "location": str(smolinstruct_tree)}


def test_smolinstruct_record_by_hand(smolinstruct_tree):
    records, _ = load_smolinstruct(str(smolinstruct_tree), ["name_conversion-s2f"], 0)
    first = records[0]  # train sample {"idx": 3, "template_id": 0}
    assert first == {
        "input": "What is the molecular formula of <SMILES> c1ccccc1 </SMILES> ?",
        "output": "It is <MOLFORMULA> C6H6 </MOLFORMULA> .",
        "raw_input": "c1ccccc1",
        "raw_output": "C6H6",
        "split": "train",
        "task": "name_conversion-s2f",
        "input_core_tag_left": "<SMILES>",
        "input_core_tag_right": "</SMILES>",
        "output_core_tag_left": "<MOLFORMULA>",
        "output_core_tag_right": "</MOLFORMULA>",
        "target": None,
    }
    assert [r["raw_input"] for r in records if r["split"] == "train"] == ["c1ccccc1", "CCO", "CCN", "CCC", "CCCC"]


def test_smolinstruct_dict_outputs_take_the_samples_target(smolinstruct_tree):
    records, _ = load_smolinstruct(str(smolinstruct_tree), ["property_prediction-sider"], 0)
    train = [r for r in records if r["split"] == "train"]
    assert [(r["raw_input"], r["target"], r["raw_output"]) for r in train] == [
        ("CCCl", "Hepatobiliary disorders", "Yes"),
        ("CCCl", "Vascular disorders", "No"),
        ("CCBr", "Vascular disorders", "Yes"),
        ("CCCBr", "Hepatobiliary disorders", "No"),
    ]
    assert train[1]["input"] == "Is <SMILES> CCCl </SMILES> linked to vascular disorders?"
    assert train[1]["output"] == "The answer is <BOOLEAN> No </BOOLEAN> ."


def test_smolinstruct_untagged_outputs_stay_bare(smolinstruct_tree):
    records, _ = load_smolinstruct(str(smolinstruct_tree), ["molecule_captioning"], 0)
    test = [r for r in records if r["split"] == "test"]
    assert test[0]["output"] == "The molecule is nonan-1-ol."
    assert test[0]["output_core_tag_left"] is None and test[0]["output_core_tag_right"] is None


def test_smolinstruct_dev_is_validation(smolinstruct_tree):
    records, _ = load_smolinstruct(str(smolinstruct_tree), SMOL_TASKS, 0)
    assert Counter(r["split"] for r in records) == {"train": 11, "validation": 4, "test": 6}


@pytest.mark.parametrize("as_zip", [False, True])
def test_smolinstruct_without_dev_gives_no_validation_records(smolinstruct_tree, tmp_path, as_zip):
    for folder in (smolinstruct_tree / "raw" / "dev", smolinstruct_tree / "sample" / "instruction_tuning" / "dev"):
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
    location = zip_at_top(smolinstruct_tree, tmp_path / "data.zip") if as_zip else smolinstruct_tree
    records, _ = load_smolinstruct(str(location), SMOL_TASKS, 0)
    assert Counter(r["split"] for r in records) == {"train": 11, "test": 6}


@pytest.mark.parametrize("cap", [1, 2, 3])
def test_smolinstruct_max_per_task_caps_each_task_and_split(smolinstruct_tree, cap):
    records, _ = load_smolinstruct(str(smolinstruct_tree), SMOL_TASKS, cap)
    assert by_task_and_split(records) == by_task_and_split(upstream_records(smolinstruct_tree, SMOL_TASKS, cap))
    counts = Counter((r["task"], r["split"]) for r in records)
    assert max(counts.values()) == cap
    assert counts[("molecule_captioning", "validation")] == 1  # fewer samples than the cap


@pytest.mark.parametrize("layout", ["top", "one-folder-down"])
def test_smolinstruct_zip_equals_the_folder(smolinstruct_tree, tmp_path, layout):
    if layout == "top":
        archive = zip_at_top(smolinstruct_tree, tmp_path / "data.zip")
    else:
        archive = zip_one_folder_down(smolinstruct_tree, tmp_path / "data.zip")
        with zipfile.ZipFile(archive) as handle:
            assert all(name.startswith("SMolInstruct/") for name in handle.namelist())
    from_zip, info = load_smolinstruct(str(archive), SMOL_TASKS, 0)
    from_folder, _ = load_smolinstruct(str(smolinstruct_tree), SMOL_TASKS, 0)
    assert from_zip == from_folder
    assert info["location"] == str(archive)


def test_smolinstruct_folder_one_level_down(smolinstruct_tree):
    records, _ = load_smolinstruct(str(smolinstruct_tree.parent), ["name_conversion-s2f"], 0)
    assert len(records) == 10


def test_smolinstruct_missing_tree(tmp_path):
    with pytest.raises(ChemFLError, match="does not exist"):
        load_smolinstruct(str(tmp_path / "nowhere.zip"), SMOL_TASKS, 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ChemFLError, match="no core_tag/ folder"):
        load_smolinstruct(str(tmp_path / "empty"), SMOL_TASKS, 0)
    (tmp_path / "data.zip").write_text("not a zip")
    with pytest.raises(ChemFLError, match="neither a folder nor a zip"):
        load_smolinstruct(str(tmp_path / "data.zip"), SMOL_TASKS, 0)
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as handle:
        handle.writestr("readme.txt", "hello")
    with pytest.raises(ChemFLError, match="no core_tag/ folder"):
        load_smolinstruct(str(tmp_path / "other.zip"), SMOL_TASKS, 0)


def test_smolinstruct_task_missing_from_the_tree(smolinstruct_tree):
    with pytest.raises(ChemFLError, match="missing"):
        load_smolinstruct(str(smolinstruct_tree), ["name_conversion-i2s"], 0)


@pytest.mark.parametrize("as_zip", [False, True])
def test_smolinstruct_missing_raw_file_is_a_chemfl_error(smolinstruct_tree, tmp_path, as_zip):
    (smolinstruct_tree / "raw" / "dev" / "name_conversion-s2f.jsonl").unlink()
    location = zip_at_top(smolinstruct_tree, tmp_path / "data.zip") if as_zip else smolinstruct_tree
    with pytest.raises(ChemFLError, match="name_conversion-s2f"):
        load_smolinstruct(str(location), ["name_conversion-s2f"], 0)


def test_smolinstruct_sample_index_past_the_raw_file(tmp_path):
    tree = {
        "name_conversion-s2f": {
            **SMOL_TREE["name_conversion-s2f"],
            "samples": {**SMOL_TREE["name_conversion-s2f"]["samples"], "test": [(7, 0)]},
        }
    }
    root = write_smolinstruct_tree(tmp_path / "tree", tree)
    with pytest.raises(ChemFLError, match="sample index 7 is past the end"):
        load_smolinstruct(str(root), ["name_conversion-s2f"], 0)


# --- files -------------------------------------------------------------------------------------


def file_record(task: str, raw_input: str, raw_output: str, split: str | None = None, **extra) -> dict:
    record = {
        "input": f"Formula of <SMILES> {raw_input} </SMILES> ?",
        "output": f"<MOLFORMULA> {raw_output} </MOLFORMULA>",
        "raw_input": raw_input,
        "raw_output": raw_output,
        "task": task,
        "input_core_tag_left": "<SMILES>",
        "input_core_tag_right": "</SMILES>",
        "output_core_tag_left": "<MOLFORMULA>",
        "output_core_tag_right": "</MOLFORMULA>",
    }
    if split is not None:
        record["split"] = split
    record.update(extra)
    return record


def write(path: Path, rows: list[dict]) -> str:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows) + "\n", encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    else:  # every column of every row (from_pylist would take the first row's keys only)
        columns = list(dict.fromkeys(key for row in rows for key in row))
        pq.write_table(pa.Table.from_pylist([{key: row.get(key) for key in columns} for row in rows]), path)
    return str(path)


ROWS = [
    file_record("s2f", "CCO", "C2H6O", "train"),
    file_record("s2f", "CCC", "C3H8", "dev"),
    file_record("s2f", "CCCC", "C4H10", "valid"),
    file_record("s2f", "CCCCC", "C5H12", "val"),
    file_record("s2f", "C", "CH4", "test"),
    file_record("s2f", "CC", "C2H6", "validation"),
    file_record("i2f", "CCCCCC", "C6H14", "train", target="x"),
    file_record("s2f", "CCN", "C2H7N", "train"),
]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_files_read_every_format_with_split_aliases(tmp_path, suffix):
    path = write(tmp_path / f"data{suffix}", ROWS)
    records, info = load_files([path], None, 0)
    assert info == {"name": "files", "paths": [path]}
    assert [r["split"] for r in records] == [
        "train",
        "validation",
        "validation",
        "validation",
        "test",
        "validation",
        "train",
        "train",
    ]
    assert all(list(r) == list(FIELDS) for r in records)
    assert [r["raw_input"] for r in records] == [row["raw_input"] for row in ROWS]
    assert records[6]["target"] == "x"
    assert records[0]["target"] is None


def test_files_from_several_paths_are_concatenated(tmp_path):
    first = write(tmp_path / "a.jsonl", ROWS[:3])
    second = write(tmp_path / "b.parquet", ROWS[3:])
    records, _ = load_files([first, second], None, 0)
    assert [r["raw_input"] for r in records] == [row["raw_input"] for row in ROWS]


def test_files_without_splits_have_none(tmp_path):
    rows = [{k: v for k, v in row.items() if k != "split"} for row in ROWS]
    records, _ = load_files([write(tmp_path / "a.jsonl", rows)], None, 0)
    assert {r["split"] for r in records} == {None}


def test_files_missing_required_columns_names_them(tmp_path):
    rows = [{k: v for k, v in row.items() if k not in ("raw_output", "output_core_tag_right")} for row in ROWS]
    path = write(tmp_path / "a.jsonl", rows)
    with pytest.raises(ChemFLError) as error:
        load_files([path], None, 0)
    message = str(error.value)
    assert "['raw_output', 'output_core_tag_right']" in message
    assert path in message
    assert set(REQUIRED_FIELDS) - {"raw_output", "output_core_tag_right"} <= set(FIELDS)


def test_files_task_filter_and_cap(tmp_path):
    path = write(tmp_path / "a.jsonl", ROWS)
    records, _ = load_files([path], ["s2f"], 0)
    assert {r["task"] for r in records} == {"s2f"} and len(records) == 7
    records, _ = load_files([path], ["s2f"], 1)
    assert [(r["raw_input"], r["split"]) for r in records] == [("CCO", "train"), ("CCC", "validation"), ("C", "test")]
    records, _ = load_files([path], None, 2)
    assert Counter((r["task"], r["split"]) for r in records) == {
        ("s2f", "train"): 2,
        ("s2f", "validation"): 2,
        ("s2f", "test"): 1,
        ("i2f", "train"): 1,
    }


def test_files_bad_input(tmp_path):
    with pytest.raises(ChemFLError, match="needs data.files"):
        load_files([], None, 0)
    with pytest.raises(ChemFLError, match="does not exist"):
        load_files([str(tmp_path / "missing.jsonl")], None, 0)
    csv = tmp_path / "a.csv"
    csv.write_text("input,output\n")
    with pytest.raises(ChemFLError, match="use one of .jsonl, .json, .parquet"):
        load_files([str(csv)], None, 0)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ChemFLError, match="holds no records"):
        load_files([str(tmp_path / "empty.jsonl")], None, 0)
    (tmp_path / "object.json").write_text(json.dumps({"records": ROWS}))
    with pytest.raises(ChemFLError, match="must hold a list"):
        load_files([str(tmp_path / "object.json")], None, 0)
    with pytest.raises(ChemFLError, match="unknown split 'holdout'"):
        load_files([write(tmp_path / "b.jsonl", [file_record("s2f", "C", "CH4", "holdout")])], None, 0)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("cut.jsonl", lambda: write_rows_text(ROWS)[:-20], r"cut.jsonl, line 8: not a JSON record"),
        ("cut.json", lambda: json.dumps(ROWS)[:-5], r"cut.json is not valid JSON"),
        ("ints.json", lambda: "[1, 2]", r"record 1 is int 1, not an object"),
        ("latin.jsonl", lambda: "\xff\n".encode("latin-1"), r"latin.jsonl is not UTF-8 text"),
        ("fake.parquet", lambda: b"PAR1 garbage", r"fake.parquet is not a readable parquet file"),
    ],
)
def test_files_that_cannot_be_parsed_are_chemfl_errors(tmp_path, name, content, message):
    data = content()
    (tmp_path / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    with pytest.raises(ChemFLError, match=message):
        load_files([str(tmp_path / name)], None, 0)


def write_rows_text(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


@pytest.mark.parametrize(
    "relative, message",
    [
        ("template/instruction_tuning/name_conversion-s2f.json", r"template/instruction_tuning/.* is damaged"),
        ("core_tag/name_conversion-s2f.json", r"core_tag/name_conversion-s2f.json is damaged"),
        ("sample/instruction_tuning/test/name_conversion-s2f.json", r"sample/instruction_tuning/test/.* is damaged"),
        ("raw/test/name_conversion-s2f.jsonl", r"raw/test/name_conversion-s2f.jsonl, line 1, is damaged"),
    ],
)
def test_smolinstruct_damaged_files_are_chemfl_errors(smolinstruct_tree, relative, message):
    path = smolinstruct_tree / relative
    path.write_text(path.read_text()[:7] + "\n")
    with pytest.raises(ChemFLError, match=message):
        load_smolinstruct(str(smolinstruct_tree), ["name_conversion-s2f"], 0)


# --- offline -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def offline():
    return load_offline(OFFLINE_TASKS, 60, 42, 0.1, 0.05)


def test_offline_records_have_the_smolinstruct_fields_and_six_tasks(offline):
    records, info = offline
    assert all(list(r) == list(FIELDS) for r in records)
    assert len(records) == 60 * 6
    assert Counter(r["task"] for r in records) == {task: 60 for task in OFFLINE_TASKS}
    # Split per molecule at the source: all six records of a molecule share one split.
    assert {r["split"] for r in records} == {"train", "validation", "test"}
    for start in range(0, len(records), 6):
        assert len({r["split"] for r in records[start : start + 6]}) == 1
    assert info["name"] == "offline" and info["molecules"] == 60


def test_offline_inputs_hold_their_tagged_cores(offline):
    for record in offline[0]:
        core_in = f"{record['input_core_tag_left']} {record['raw_input']} {record['input_core_tag_right']}"
        core_out = f"{record['output_core_tag_left']} {record['raw_output']} {record['output_core_tag_right']}"
        assert core_in in record["input"] and "<INPUT>" not in record["input"]
        assert core_out in record["output"] and "<OUTPUT>" not in record["output"]


def test_offline_labels_agree_with_rdkit(offline):
    records = offline[0]
    smiles_of_name = {r["raw_input"]: r["raw_output"] for r in records if r["task"] == "name_conversion-i2s"}
    assert len(smiles_of_name) == 60
    for record in records:
        task = record["task"]
        smiles = smiles_of_name[record["raw_input"]] if task.startswith("name_conversion-i2") else record["raw_input"]
        mol = Chem.MolFromSmiles(smiles)
        assert mol is not None, smiles
        if task.endswith("2f"):
            assert record["raw_output"] == rdMolDescriptors.CalcMolFormula(mol)
        elif task == "name_conversion-i2s":
            assert record["raw_output"] == Chem.MolToSmiles(mol)
        elif task == "name_conversion-s2i":
            assert smiles_of_name[record["raw_output"]] == smiles
        elif task == "property_prediction-logp":
            assert abs(float(record["raw_output"]) - Crippen.MolLogP(mol)) <= 0.005 + 1e-9
            assert record["raw_output"] == f"{float(record['raw_output']):.2f}"
        else:
            fragment_like = (
                Descriptors.MolWt(mol) <= 300
                and Crippen.MolLogP(mol) <= 3
                and Lipinski.NumHDonors(mol) <= 3
                and Lipinski.NumHAcceptors(mol) <= 3
                and rdMolDescriptors.CalcNumRotatableBonds(mol) <= 3
            )
            assert record["raw_output"] == ("Yes" if fragment_like else "No")


def test_offline_is_deterministic_and_seeded(offline):
    again, _ = load_offline(OFFLINE_TASKS, 60, 42, 0.1, 0.05)
    assert again == offline[0]
    other, _ = load_offline(OFFLINE_TASKS, 60, 43, 0.1, 0.05)
    assert other != offline[0]


def test_offline_task_subset_draws_the_same_molecules(offline):
    subset, _ = load_offline(["name_conversion-s2f"], 60, 42, 0.1, 0.05)
    assert [r["raw_input"] for r in subset] == [
        r["raw_input"] for r in offline[0] if r["task"] == "name_conversion-s2f"
    ]
