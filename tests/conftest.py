"""Shared fixtures: small configs, one small offline build per session, SMolInstruct-style trees."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from chemfl.config import resolve
from chemfl.data_prep.build import BuildSpec, build_dataset

SMALL_MOLECULES = 60
OFFLINE_TASKS = (
    "name_conversion-i2s",
    "name_conversion-s2i",
    "name_conversion-i2f",
    "name_conversion-s2f",
    "property_prediction-logp",
    "property_prediction-ro3",
)


def make_config(overrides: dict | None = None, /, **knobs) -> dict:
    """resolve() of a small offline build.

    `knobs` name data.* keys with '_' for '-' (max_molecules=60, partition_scheme="iid");
    `overrides` takes full keys ({"data.max-molecules": 60}) and wins.
    """
    values: dict = {"data.max-molecules": SMALL_MOLECULES}
    for name, value in knobs.items():
        values["data." + name.replace("_", "-")] = value
    values.update(overrides or {})
    return resolve(values)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes)."""
    return {
        str(path.relative_to(folder)): path.read_bytes() for path in sorted(Path(folder).rglob("*")) if path.is_file()
    }


def dot_entries(parent: Path) -> list[str]:
    """Hidden entries of `parent`: where a build stages (.<name>.partial-*, .<name>.previous-*)."""
    return sorted(path.name for path in Path(parent).iterdir() if path.name.startswith("."))


@pytest.fixture
def small_config() -> Callable[..., dict]:
    return make_config


@pytest.fixture
def small_spec() -> Callable[..., BuildSpec]:
    return lambda *args, **knobs: BuildSpec.from_config(make_config(*args, **knobs))


@pytest.fixture(scope="session")
def small_build(tmp_path_factory) -> Path:
    """A 60-molecule offline build (default facilities, iid, seed 42). Read it; never edit it."""
    out = tmp_path_factory.mktemp("small-build") / "build"
    build_dataset(BuildSpec.from_config(make_config()), out)
    return out


@pytest.fixture
def build_copy(small_build, tmp_path) -> Path:
    """A private copy of the session build, free to tamper with."""
    out = tmp_path / "build"
    shutil.copytree(small_build, out)
    return out


# --- SMolInstruct's data.zip layout, in miniature -------------------------------------------------

SMOL_FOLDERS = ("train", "dev", "test")

# task -> core tags, templates, raw lines per split folder, samples per split folder.
# Raw lines hold more rows than are sampled, and samples list them out of order, so the
# parser must follow `idx` rather than line order.
SMOL_TREE: dict[str, dict] = {
    "name_conversion-s2f": {
        "core_tag": {"input": ["<SMILES>", "</SMILES>"], "output": ["<MOLFORMULA>", "</MOLFORMULA>"]},
        "templates": [
            {"input": "What is the molecular formula of <INPUT> ?", "output": "It is <OUTPUT> ."},
            {"input": "Give the formula of <INPUT>", "output": "<OUTPUT>"},
        ],
        "raw": {
            "train": [
                ("CCO", "C2H6O"),
                ("CCC", "C3H8"),
                ("CCCC", "C4H10"),
                ("c1ccccc1", "C6H6"),
                ("CC(=O)O", "C2H4O2"),
                ("CCN", "C2H7N"),
            ],
            "dev": [("CCCCC", "C5H12"), ("CO", "CH4O")],
            "test": [("OCC", "C2H6O"), ("CCCCCC", "C6H14"), ("ClCCl", "CH2Cl2")],
        },
        "samples": {
            "train": [(3, 0), (0, 1), (5, 0), (1, 1), (2, 0)],
            "dev": [(1, 0), (0, 1)],
            "test": [(2, 1), (0, 0), (1, 0)],
        },
    },
    "property_prediction-sider": {
        "core_tag": {"input": ["<SMILES>", "</SMILES>"], "output": ["<BOOLEAN>", "</BOOLEAN>"]},
        "templates": [
            {"input": "Can <INPUT> cause hepatobiliary disorders?", "output": "<OUTPUT>"},
            {"input": "Is <INPUT> linked to vascular disorders?", "output": "The answer is <OUTPUT> ."},
        ],
        "raw": {
            "train": [
                ("CCCl", {"Hepatobiliary disorders": "Yes", "Vascular disorders": "No"}),
                ("CCBr", {"Hepatobiliary disorders": "No", "Vascular disorders": "Yes"}),
                ("CCCBr", {"Hepatobiliary disorders": "No", "Vascular disorders": "No"}),
            ],
            "dev": [("CCCCBr", {"Hepatobiliary disorders": "Yes", "Vascular disorders": "Yes"})],
            "test": [("CCCCCl", {"Hepatobiliary disorders": "No", "Vascular disorders": "Yes"})],
        },
        "samples": {
            "train": [
                (0, 0, "Hepatobiliary disorders"),
                (0, 1, "Vascular disorders"),
                (1, 1, "Vascular disorders"),
                (2, 0, "Hepatobiliary disorders"),
            ],
            "dev": [(0, 1, "Vascular disorders")],
            "test": [(0, 0, "Hepatobiliary disorders"), (0, 1, "Vascular disorders")],
        },
    },
    "molecule_captioning": {
        "core_tag": {"input": ["<SMILES>", "</SMILES>"], "output": [None, None]},
        "templates": [{"input": "Describe <INPUT> .", "output": "<OUTPUT>"}],
        "raw": {
            "train": [("CCCCCCO", "The molecule is hexan-1-ol."), ("CCCCCCCO", "The molecule is heptan-1-ol.")],
            "dev": [("CCCCCCCCO", "The molecule is octan-1-ol.")],
            "test": [("CCCCCCCCCO", "The molecule is nonan-1-ol.")],
        },
        "samples": {"train": [(1, 0), (0, 0)], "dev": [(0, 0)], "test": [(0, 0)]},
    },
}


def write_smolinstruct_tree(root: Path, tree: dict[str, dict] = SMOL_TREE) -> Path:
    """Write `tree` in the exact layout of SMolInstruct's data.zip under `root`."""

    def dump(relative: str, data) -> None:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data), encoding="utf-8")

    for task, spec in tree.items():
        dump(f"core_tag/{task}.json", spec["core_tag"])
        dump(f"template/instruction_tuning/{task}.json", spec["templates"])
        for folder in SMOL_FOLDERS:
            lines = [
                json.dumps({"input": core_in, "output": core_out, "task": task, "split": folder})
                for core_in, core_out in spec["raw"][folder]
            ]
            path = root / "raw" / folder / f"{task}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
            samples = []
            for sample in spec["samples"][folder]:
                entry = {"idx": sample[0], "template_id": sample[1]}
                if len(sample) == 3:
                    entry["target"] = sample[2]
                samples.append(entry)
            dump(
                f"sample/instruction_tuning/{folder}/{task}.json",
                {"task": task, "split": folder, "template_name": "instruction_tuning", "samples": samples},
            )
    return root


@pytest.fixture
def smolinstruct_tree(tmp_path) -> Path:
    """A folder holding a miniature SMolInstruct tree (see SMOL_TREE)."""
    return write_smolinstruct_tree(tmp_path / "SMolInstruct")


@pytest.fixture
def server_task_identity():
    """Instruction messages take their sender from the process's task identity, which Flower sets
    in a running ServerApp; tests that build them play the server."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
