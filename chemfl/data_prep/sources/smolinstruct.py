"""osunlp/SMolInstruct read from its data files (its loading script no longer runs on `datasets`).

Layout inside the Hub's `data.zip` (or an extracted folder):
  core_tag/<task>.json                         {"input": [left, right], "output": [left, right]}
  raw/<split>/<task>.jsonl                     {"input": ..., "output": str | {target: str}, ...}
  sample/instruction_tuning/<split>/<task>.json {"template_name": ..., "samples": [{"idx", "template_id", "target"?}]}
  template/<template_name>/<task>.json         [{"input": "...<INPUT>...", "output": "...<OUTPUT>..."}]
with <split> in train, dev, test. Records are rebuilt exactly as the loading script builds them.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chemfl.data_prep.schema import make_record
from chemfl.errors import ChemFLError

HUB_REPO = "osunlp/SMolInstruct"
HUB_FILE = "data.zip"

SMOLINSTRUCT_TASKS: tuple[str, ...] = (
    "forward_synthesis",
    "retrosynthesis",
    "molecule_captioning",
    "molecule_generation",
    "name_conversion-i2f",
    "name_conversion-i2s",
    "name_conversion-s2f",
    "name_conversion-s2i",
    "property_prediction-esol",
    "property_prediction-lipo",
    "property_prediction-bbbp",
    "property_prediction-clintox",
    "property_prediction-hiv",
    "property_prediction-sider",
)
# SMolInstruct's folder name -> ChemFL's split name.
SPLIT_FOLDERS = {"train": "train", "dev": "validation", "test": "test"}


def download_from_hub() -> Path:
    """data.zip from the Hub (cached by huggingface_hub); needs network access to the Hub."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=HUB_REPO, filename=HUB_FILE, repo_type="dataset"))
    except Exception as error:  # offline, proxy, auth: all end the same way for the user
        raise ChemFLError(
            f"could not download {HUB_FILE} of {HUB_REPO} from the Hugging Face Hub ({error}); "
            "on a machine without Hub access, copy data.zip here and set data.smolinstruct-path "
            'to it, or use data.source = "offline"'
        ) from error


def open_tree(location: Path) -> Any:
    """A path-like root (pathlib.Path or zipfile.Path) holding core_tag/, raw/, sample/, template/."""
    if location.is_dir():
        candidates = [location, *sorted(p for p in location.iterdir() if p.is_dir())]
    elif zipfile.is_zipfile(location):
        archive = zipfile.ZipFile(location)
        top = zipfile.Path(archive)
        candidates = [top, *sorted((p for p in top.iterdir() if p.is_dir()), key=lambda p: p.name)]
    else:
        raise ChemFLError(
            f"data.smolinstruct-path {location} is neither a folder nor a zip file; point it at "
            "SMolInstruct's data.zip or the folder it extracts to"
        )
    for candidate in candidates:  # the zip may hold the tree at its top or one folder down
        if (candidate / "core_tag").is_dir():
            return candidate
    raise ChemFLError(
        f"{location} does not look like SMolInstruct's data (no core_tag/ folder at its top or one "
        "level down); point data.smolinstruct-path at SMolInstruct's data.zip"
    )


def load_smolinstruct(location: str, tasks: Sequence[str], max_per_task: int) -> tuple[list[dict], dict]:
    """Records of `tasks` in all three splits; at most `max_per_task` per task and split (0: all).

    A copy without the dev split (neither raw/dev/ nor sample/.../dev/ holds the task) gives no
    validation records for that task; the build then carves validation out of train."""
    path = Path(location).expanduser() if location else download_from_hub()
    if not path.exists():
        raise ChemFLError(f"data.smolinstruct-path {path} does not exist")
    root = open_tree(path)
    records: list[dict] = []
    for task in tasks:
        for folder, split in SPLIT_FOLDERS.items():
            if folder == "dev" and not _has_split(root, task, folder):
                continue
            records.extend(_task_split_records(root, task, folder, split, max_per_task))
    return records, {"name": "smolinstruct", "location": location or f"hub:{HUB_REPO}/{HUB_FILE}"}


def _has_split(root: Any, task: str, folder: str) -> bool:
    """Whether the tree holds any file of `task` in split `folder` (one of the two alone is an
    incomplete download, reported when read)."""
    return (root / "raw" / folder / f"{task}.jsonl").is_file() or (
        root / "sample" / "instruction_tuning" / folder / f"{task}.json"
    ).is_file()


def _read_json(node: Any) -> Any:
    try:
        return json.loads(node.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ChemFLError(f"SMolInstruct data is missing {node}; is the download complete?") from error
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise ChemFLError(f"SMolInstruct data file {node} is damaged ({error}); download data.zip again") from None


def _task_split_records(root: Any, task: str, folder: str, split: str, cap: int) -> list[dict]:
    core_tags = _read_json(root / "core_tag" / f"{task}.json")
    sample_file = _read_json(root / "sample" / "instruction_tuning" / folder / f"{task}.json")
    templates = _read_json(root / "template" / sample_file["template_name"] / f"{task}.json")
    samples = sample_file["samples"][:cap] if cap > 0 else sample_file["samples"]
    wanted = {sample["idx"] for sample in samples}
    raw: dict[int, dict] = {}
    raw_file = root / "raw" / folder / f"{task}.jsonl"
    if not raw_file.is_file():
        raise ChemFLError(f"SMolInstruct data is missing {raw_file}; is the download complete?")
    with raw_file.open("r", encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            if index in wanted:
                try:
                    raw[index] = json.loads(line)
                except ValueError as error:
                    raise ChemFLError(
                        f"SMolInstruct data file {raw_file}, line {index + 1}, is damaged ({error}); "
                        "download data.zip again"
                    ) from None
    (in_left, in_right), (out_left, out_right) = core_tags["input"], core_tags["output"]
    records = []
    for sample in samples:
        if sample["idx"] not in raw:
            raise ChemFLError(
                f"SMolInstruct {folder}/{task}: sample index {sample['idx']} is past the end of "
                "its raw file; the data files are from different versions"
            )
        item = raw[sample["idx"]]
        template = templates[sample["template_id"]]
        raw_output, target = item["output"], None
        if isinstance(raw_output, dict):  # several properties per molecule (sider)
            target = sample["target"]
            raw_output = raw_output[target]
        raw_input, raw_output = str(item["input"]), str(raw_output)
        records.append(
            make_record(
                template["input"],
                template["output"],
                raw_input,
                raw_output,
                task,
                (in_left, in_right),
                (out_left, out_right),
                split=split,
                target=None if target is None else str(target),
            )
        )
    return records
