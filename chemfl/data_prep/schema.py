"""The SMolInstruct record schema and the answer kinds its output tags stand for."""

from __future__ import annotations

from enum import Enum

import pyarrow as pa

# Field order of osunlp/SMolInstruct records. `target` names the property when a raw output
# holds several (SMolInstruct's sider task); it is null otherwise.
FIELDS: tuple[str, ...] = (
    "input",
    "output",
    "raw_input",
    "raw_output",
    "split",
    "task",
    "input_core_tag_left",
    "input_core_tag_right",
    "output_core_tag_left",
    "output_core_tag_right",
    "target",
)
REQUIRED_FIELDS: tuple[str, ...] = tuple(f for f in FIELDS if f not in ("split", "target"))

ARROW_SCHEMA = pa.schema([pa.field(name, pa.string()) for name in FIELDS])

SPLITS: tuple[str, ...] = ("train", "validation", "test")


class AnswerKind(str, Enum):
    """How an answer is scored; decided by the record's output core tag."""

    SMILES = "smiles"
    FORMULA = "formula"
    IUPAC = "iupac"
    NUMBER = "number"
    BOOLEAN = "boolean"
    TEXT = "text"


_KIND_BY_TAG = {
    "<SMILES>": AnswerKind.SMILES,
    "<SELFIES>": AnswerKind.TEXT,  # scored as text: decoding SELFIES is out of scope
    "<MOLFORMULA>": AnswerKind.FORMULA,
    "<IUPAC>": AnswerKind.IUPAC,
    "<NUMBER>": AnswerKind.NUMBER,
    "<BOOLEAN>": AnswerKind.BOOLEAN,
}


def answer_kind(output_core_tag_left: str | None) -> AnswerKind:
    return _KIND_BY_TAG.get(output_core_tag_left or "", AnswerKind.TEXT)


def tagged(core: str, left: str | None, right: str | None) -> str:
    """SMolInstruct writes a core between its tags with one space on each side."""
    if not left:
        return core
    return f"{left} {core} {right}"


def make_record(
    input_template: str,
    output_template: str,
    raw_input: str,
    raw_output: str,
    task: str,
    input_tag: tuple[str | None, str | None],
    output_tag: tuple[str | None, str | None],
    split: str | None = None,
    target: str | None = None,
) -> dict[str, str | None]:
    """A SMolInstruct record: the tagged cores put where the templates say <INPUT> and <OUTPUT>."""
    return {
        "input": input_template.replace("<INPUT>", tagged(raw_input, *input_tag)),
        "output": output_template.replace("<OUTPUT>", tagged(raw_output, *output_tag)),
        "raw_input": raw_input,
        "raw_output": raw_output,
        "split": split,
        "task": task,
        "input_core_tag_left": input_tag[0],
        "input_core_tag_right": input_tag[1],
        "output_core_tag_left": output_tag[0],
        "output_core_tag_right": output_tag[1],
        "target": target,
    }
