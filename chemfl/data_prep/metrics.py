"""Scoring as LlaSMol scores SMolInstruct: extract the answer between the output tags, then compare
the way a chemist would. SMILES by molecule identity (RDKit), formulas by element counts, IUPAC
names after normalisation, numbers by RMSE, booleans by accuracy. A missing or unparseable answer
is counted as invalid (a separate rate) and never as a match.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from chemfl.data_prep import chem
from chemfl.data_prep.schema import AnswerKind, answer_kind

BOOLEAN_WORDS = {"yes": True, "true": True, "no": False, "false": False}


def extract_answer(text: str, left_tag: str | None, right_tag: str | None) -> str | None:
    """The first core between `left_tag` and `right_tag`, stripped; None when the tags are missing."""
    if not left_tag:
        return text.strip() or None
    match = re.search(re.escape(left_tag) + r"(.*?)" + re.escape(right_tag), text, flags=re.DOTALL)
    if match is None:
        return None
    return match.group(1).strip() or None


@dataclass(frozen=True)
class Judgement:
    valid: bool  # the answer was found and parses as its kind
    correct: bool
    value: float | None = None  # numeric answers, for RMSE


def judge(kind: AnswerKind, predicted: str | None, gold: str) -> Judgement:
    """Compare one extracted answer with the gold core."""
    if predicted is None:
        return Judgement(valid=False, correct=False)
    if kind is AnswerKind.SMILES:
        if chem.canonical_smiles(predicted) is None:
            return Judgement(valid=False, correct=False)
        return Judgement(valid=True, correct=chem.same_molecule(predicted, gold))
    if kind is AnswerKind.FORMULA:
        counts = chem.parse_formula(predicted)
        return Judgement(valid=counts is not None, correct=counts is not None and counts == chem.parse_formula(gold))
    if kind is AnswerKind.IUPAC:
        return Judgement(valid=True, correct=chem.normalize_iupac(predicted) == chem.normalize_iupac(gold))
    if kind is AnswerKind.NUMBER:
        value = _to_float(predicted)
        if value is None:
            return Judgement(valid=False, correct=False)
        gold_value = float(gold)
        decimals = len(gold.strip().partition(".")[2])
        # Equal at the precision the label is written with.
        correct = abs(value - gold_value) <= 0.5 * 10.0**-decimals + 1e-12
        return Judgement(valid=True, correct=correct, value=value)
    if kind is AnswerKind.BOOLEAN:
        answer = BOOLEAN_WORDS.get(predicted.strip().lower())
        if answer is None:
            return Judgement(valid=False, correct=False)
        return Judgement(valid=True, correct=answer == BOOLEAN_WORDS[gold.strip().lower()])
    return Judgement(valid=True, correct=" ".join(predicted.split()) == " ".join(gold.split()))


def _to_float(text: str) -> float | None:
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def score(records: Sequence[dict], predictions: Sequence[str]) -> dict:
    """Per-task and overall metrics of `predictions` (full generated texts) against `records`.

    Per task: n, exact_match, invalid_rate; number tasks add rmse (over valid answers);
    boolean tasks add accuracy. Overall: macro means of exact_match and invalid_rate over tasks.
    """
    if len(records) != len(predictions):
        raise ValueError(f"{len(records)} records but {len(predictions)} predictions")
    judged: dict[str, list[tuple[Judgement, str]]] = defaultdict(list)
    kinds: dict[str, AnswerKind] = {}
    for record, text in zip(records, predictions, strict=False):
        kind = answer_kind(record["output_core_tag_left"])
        kinds[record["task"]] = kind
        answer = extract_answer(text, record["output_core_tag_left"], record["output_core_tag_right"])
        judged[record["task"]].append((judge(kind, answer, record["raw_output"]), record["raw_output"]))
    tasks = {task: _task_metrics(kinds[task], items) for task, items in sorted(judged.items())}
    overall = {
        "n": sum(metrics["n"] for metrics in tasks.values()),
        "exact_match": _mean([metrics["exact_match"] for metrics in tasks.values()]),
        "invalid_rate": _mean([metrics["invalid_rate"] for metrics in tasks.values()]),
    }
    return {"tasks": tasks, "overall": overall}


def _task_metrics(kind: AnswerKind, items: list[tuple[Judgement, str]]) -> dict:
    n = len(items)
    metrics: dict = {
        "kind": kind.value,
        "n": n,
        "exact_match": sum(j.correct for j, _ in items) / n,
        "invalid_rate": sum(not j.valid for j, _ in items) / n,
    }
    if kind is AnswerKind.NUMBER:
        errors = [(j.value - float(gold)) ** 2 for j, gold in items if j.value is not None]
        metrics["rmse"] = math.sqrt(sum(errors) / len(errors)) if errors else None
    if kind is AnswerKind.BOOLEAN:
        metrics["accuracy"] = metrics["exact_match"]
    return metrics


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
