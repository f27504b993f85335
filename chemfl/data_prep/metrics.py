"""Scoring as LlaSMol (OSU-NLP-Group/LLM4Chem) scores SMolInstruct: extract the answer between the
output tags, then compare the way a chemist would. SMILES by molecule identity (InChIKey; a
multi-molecule answer as a set) plus fingerprint Tanimoto similarity, formulas by element counts,
IUPAC names after normalisation (and by LlaSMol's split match), numbers by RMSE, booleans by
accuracy, F1 and MCC. A missing or unparseable answer is counted as invalid (a separate rate) and
never as a match.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
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
    similarity: chem.Similarity | None = None  # valid SMILES answers whose gold parses: fingerprint Tanimoto
    split_match: bool = False  # IUPAC answers: the same `;`-separated parts, in any order
    says_yes: bool | None = None  # valid boolean answers, for F1 and MCC


def judge(kind: AnswerKind, predicted: str | None, gold: str) -> Judgement:
    """Compare one extracted answer with the gold core."""
    if predicted is None:
        return Judgement(valid=False, correct=False)
    if kind is AnswerKind.SMILES:
        if chem.canonical_smiles(predicted) is None:
            return Judgement(valid=False, correct=False)
        return Judgement(
            valid=True, correct=chem.same_molecule(predicted, gold), similarity=chem.similarity(predicted, gold)
        )
    if kind is AnswerKind.FORMULA:
        counts = chem.parse_formula(predicted)
        return Judgement(valid=counts is not None, correct=counts is not None and counts == chem.parse_formula(gold))
    if kind is AnswerKind.IUPAC:
        return Judgement(
            valid=True,
            correct=chem.normalize_iupac(predicted) == chem.normalize_iupac(gold),
            split_match=chem.iupac_parts(predicted) == chem.iupac_parts(gold),
        )
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
        return Judgement(valid=True, correct=answer == BOOLEAN_WORDS[gold.strip().lower()], says_yes=answer)
    return Judgement(valid=True, correct=" ".join(predicted.split()) == " ".join(gold.split()))


def _to_float(text: str) -> float | None:
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def score(records: Sequence[dict], predictions: Sequence[str]) -> dict:
    """Per-task and overall metrics of `predictions` (full generated texts) against `records`.

    Per task: n, exact_match, invalid_rate (over all n), and by answer kind:
      smiles:  tanimoto_maccs, tanimoto_rdkit, tanimoto_morgan (means over valid answers);
      iupac:   split_match (LlaSMol's: the `;`-separated parts equal in any order);
      number:  rmse (over valid answers);
      boolean: accuracy (= exact_match), f1 and mcc (over valid answers, "Yes" the positive class).
    A mean over valid answers is None when no answer is valid.
    Overall: macro means of exact_match and invalid_rate over tasks.
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
    if kind is AnswerKind.SMILES:
        similarities = [j.similarity for j, _ in items if j.similarity is not None]
        for fingerprint in ("maccs", "rdkit", "morgan"):
            values = [getattr(similarity, fingerprint) for similarity in similarities]
            metrics[f"tanimoto_{fingerprint}"] = _mean(values) if values else None
    if kind is AnswerKind.IUPAC:
        metrics["split_match"] = sum(j.split_match for j, _ in items) / n
    if kind is AnswerKind.NUMBER:
        errors = [(j.value - float(gold)) ** 2 for j, gold in items if j.value is not None]
        metrics["rmse"] = math.sqrt(sum(errors) / len(errors)) if errors else None
    if kind is AnswerKind.BOOLEAN:
        metrics["accuracy"] = metrics["exact_match"]
        answered = [(j.says_yes, BOOLEAN_WORDS[gold.strip().lower()]) for j, gold in items if j.says_yes is not None]
        metrics.update(f1=f1_score(answered), mcc=matthews_correlation(answered))
    return metrics


def f1_score(answers: Sequence[tuple[bool, bool]]) -> float | None:
    """F1 of the positive class over (predicted, gold) pairs; 0.0 when there are no true positives
    (scikit-learn's value, which LlaSMol reports), None for no pairs."""
    if not answers:
        return None
    true_pos, false_pos, false_neg, _ = _confusion(answers)
    return 2 * true_pos / (2 * true_pos + false_pos + false_neg) if true_pos else 0.0


def matthews_correlation(answers: Sequence[tuple[bool, bool]]) -> float | None:
    """Matthews correlation coefficient over (predicted, gold) pairs: +1 perfect, 0 no better than
    chance, -1 always wrong; 0.0 when a row or column of the confusion matrix is empty
    (scikit-learn's value), None for no pairs."""
    if not answers:
        return None
    true_pos, false_pos, false_neg, true_neg = _confusion(answers)
    denominator = (true_pos + false_pos) * (true_pos + false_neg) * (true_neg + false_pos) * (true_neg + false_neg)
    return (true_pos * true_neg - false_pos * false_neg) / math.sqrt(denominator) if denominator else 0.0


def _confusion(answers: Sequence[tuple[bool, bool]]) -> tuple[int, int, int, int]:
    """(true positives, false positives, false negatives, true negatives)."""
    counts = Counter(answers)
    return counts[True, True], counts[True, False], counts[False, True], counts[False, False]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
