"""Scoring answers the way LlaSMol scores SMolInstruct, on cases small enough to check by hand."""

from __future__ import annotations

import math

import pytest

from chemfl.data_prep import chem
from chemfl.data_prep.metrics import extract_answer, judge, score
from chemfl.data_prep.schema import AnswerKind, answer_kind, tagged

SMILES, FORMULA, IUPAC, NUMBER, BOOLEAN, TEXT = (
    AnswerKind.SMILES,
    AnswerKind.FORMULA,
    AnswerKind.IUPAC,
    AnswerKind.NUMBER,
    AnswerKind.BOOLEAN,
    AnswerKind.TEXT,
)

TAGS = {
    "smiles": ("<SMILES>", "</SMILES>"),
    "formula": ("<MOLFORMULA>", "</MOLFORMULA>"),
    "iupac": ("<IUPAC>", "</IUPAC>"),
    "number": ("<NUMBER>", "</NUMBER>"),
    "boolean": ("<BOOLEAN>", "</BOOLEAN>"),
}


def record(task: str, kind: str, gold: str) -> dict:
    left, right = TAGS[kind]
    return {"task": task, "raw_output": gold, "output_core_tag_left": left, "output_core_tag_right": right}


def answer(kind: str, core: str) -> str:
    """A generated text with `core` between the output tags, words around it."""
    return f"Sure. It is {tagged(core, *TAGS[kind])} ."


# --- SMILES ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "predicted, gold",
    [
        ("OCC", "CCO"),
        ("C1=CC=CC=C1", "c1ccccc1"),
        ("C(C)O", "CCO"),
        ("OC(=O)C", "CC(O)=O"),
        ("[H]OC([H])([H])C", "CCO"),
    ],
)
def test_equivalent_smiles_written_differently_match(predicted, gold):
    assert judge(SMILES, predicted, gold) == judge(SMILES, gold, gold)
    result = judge(SMILES, predicted, gold)
    assert result.valid and result.correct


@pytest.mark.parametrize("predicted, gold", [("CCC", "CCO"), ("c1ccncc1", "c1ccccc1"), ("CC(C)O", "CCCO")])
def test_different_molecules_do_not_match(predicted, gold):
    result = judge(SMILES, predicted, gold)
    assert result.valid and not result.correct


@pytest.mark.parametrize("predicted", ["C1CC", "Xx", "C(C", "c1cccc1"])
def test_invalid_smiles_is_invalid_and_never_a_match(predicted):
    assert chem.canonical_smiles(predicted) is None
    result = judge(SMILES, predicted, "CCO")
    assert not result.valid and not result.correct
    # Not even against itself.
    assert judge(SMILES, predicted, predicted).correct is False


FINGERPRINT_KEYS = ("tanimoto_maccs", "tanimoto_rdkit", "tanimoto_morgan")


@pytest.mark.parametrize(
    "predicted, gold",
    [
        ("OCC", "CCO"),
        ("C1=CC=CC=C1", "c1ccccc1"),
        ("[H]OC([H])([H])C", "CCO"),
        ("CC(O)=O.OCC", "CCO.CC(=O)O"),
    ],
)
def test_the_same_molecule_written_differently_has_tanimoto_one_by_every_fingerprint(predicted, gold):
    result = judge(SMILES, predicted, gold)
    assert result.valid and result.correct
    assert result.similarity == chem.Similarity(maccs=1.0, rdkit=1.0, morgan=1.0)
    metrics = score([record("i2s", "smiles", gold)], [answer("smiles", predicted)])["tasks"]["i2s"]
    assert metrics["exact_match"] == 1.0
    assert all(metrics[key] == 1.0 for key in FINGERPRINT_KEYS)


@pytest.mark.parametrize("predicted", ["CCO.CC(=O)O", "CC(=O)O.CCO", "OC(C)=O.C(C)O"])
def test_reactant_order_does_not_matter(predicted):
    gold = "CC(=O)O.CCO"
    result = judge(SMILES, predicted, gold)
    assert result.valid and result.correct
    assert result.similarity == chem.Similarity(maccs=1.0, rdkit=1.0, morgan=1.0)


def test_molecules_are_compared_as_a_set_as_llasmol_does():
    # LlaSMol keys a multi-molecule answer by its set of InChIs: a repeated molecule adds nothing.
    assert judge(SMILES, "CCO.CCO.CC(=O)O", "CC(=O)O.CCO").correct
    # A dot inside ring-bond numbering joins atoms: C1.C1 is one molecule, ethane.
    assert judge(SMILES, "C1.C1", "CC").correct


@pytest.mark.parametrize(
    "predicted",
    [
        "CCN.CC(=O)O",  # one reactant wrong
        "CCO.CC(=O)OC",  # the other one wrong
        "CC(=O)O",  # one missing
        "CCO.CC(=O)O.CN",  # one too many
    ],
)
def test_one_wrong_reactant_is_no_match(predicted):
    gold = "CC(=O)O.CCO"
    result = judge(SMILES, predicted, gold)
    assert result.valid and not result.correct
    similarity = result.similarity
    assert all(0.0 <= value <= 1.0 for value in (similarity.maccs, similarity.rdkit, similarity.morgan))
    # Morgan counts see every changed atom environment. The path fingerprint can miss a dropped
    # molecule whose bond paths the others also hold (ethanol's inside acetic acid's): similarity is
    # a partial-credit column, exact match the verdict.
    assert similarity.morgan < 1.0


def test_similarity_is_symmetric_and_none_for_unparseable_smiles():
    assert chem.similarity("CCO", "CCCO") == chem.similarity("CCCO", "CCO")
    assert chem.similarity("C1CC", "CCO") is None
    assert chem.similarity("CCO", "C1CC") is None


def test_tanimoto_columns_are_means_over_valid_answers():
    records = [record("fwd", "smiles", gold) for gold in ("CCO", "c1ccccc1", "CCO", "CCO")]
    predictions = [
        answer("smiles", "OCC"),  # match: 1.0
        answer("smiles", "Cc1ccccc1"),  # valid, different
        answer("smiles", "C1CC"),  # invalid: not in the means
        "no tags",  # no answer: not in the means
    ]
    metrics = score(records, predictions)["tasks"]["fwd"]
    toluene = chem.similarity("Cc1ccccc1", "c1ccccc1")
    assert metrics["exact_match"] == pytest.approx(1 / 4)
    assert metrics["invalid_rate"] == pytest.approx(2 / 4)
    assert metrics["tanimoto_maccs"] == pytest.approx((1.0 + toluene.maccs) / 2)
    assert metrics["tanimoto_rdkit"] == pytest.approx((1.0 + toluene.rdkit) / 2)
    assert metrics["tanimoto_morgan"] == pytest.approx((1.0 + toluene.morgan) / 2)
    assert metrics["tanimoto_morgan"] < 1.0


def test_tanimoto_columns_are_none_when_no_answer_is_valid():
    metrics = score([record("fwd", "smiles", "CCO")] * 2, ["nothing", answer("smiles", "C(C")])["tasks"]["fwd"]
    assert metrics["invalid_rate"] == 1.0
    assert all(metrics[key] is None for key in FINGERPRINT_KEYS)


def test_only_smiles_tasks_get_tanimoto_columns():
    result = score([record("s2f", "formula", "CH4"), record("logp", "number", "1.0")], [answer("formula", "CH4")] * 2)
    assert not any(key in metrics for metrics in result["tasks"].values() for key in FINGERPRINT_KEYS)


# --- formulas ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "predicted, gold",
    [
        ("H6C2O", "C2H6O"),
        ("OC2H6", "C2H6O"),
        ("Ca(OH)2", "CaH2O2"),
        ("CH3CH2OH", "C2H6O"),
        ("C2H6O", "C2H6O"),
        ("C 2 H6 O", "C2H6O"),
        ("C2H6O+", "C2H6O"),
    ],
)
def test_formulas_compare_by_element_counts(predicted, gold):
    result = judge(FORMULA, predicted, gold)
    assert result.valid and result.correct


@pytest.mark.parametrize(
    "predicted, gold", [("C2H5O", "C2H6O"), ("C2H6O2", "C2H6O"), ("Ca(OH)3", "CaH2O2"), ("C2H6", "C2H6O"), ("Co", "CO")]
)
def test_formulas_with_wrong_counts_do_not_match(predicted, gold):
    result = judge(FORMULA, predicted, gold)
    assert result.valid and not result.correct


@pytest.mark.parametrize("predicted", ["c2h6o", "Ca(OH2", "C2H6O)", "()", "2C", "C2-H6O", "ethanol"])
def test_unparseable_formulas_are_invalid(predicted):
    result = judge(FORMULA, predicted, "C2H6O")
    assert not result.valid and not result.correct


def test_parse_formula_counts_nested_groups():
    assert chem.parse_formula("Ca(OH)2") == {"Ca": 1, "O": 2, "H": 2}
    assert chem.parse_formula("((CH3)2)2C") == {"C": 5, "H": 12}
    assert chem.parse_formula(None) is None
    assert chem.parse_formula("  ") is None


# --- missing tags ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "The formula is C2H6O.",
        "<MOLFORMULA> C2H6O",
        "C2H6O </MOLFORMULA>",
        "<MOLFORMULA>  </MOLFORMULA>",
        "</MOLFORMULA> C2H6O <MOLFORMULA>",
        "",
    ],
)
def test_a_missing_tagged_answer_is_a_miss_counted_invalid(text):
    left, right = TAGS["formula"]
    assert extract_answer(text, left, right) is None
    result = score([record("s2f", "formula", "C2H6O")], [text])["tasks"]["s2f"]
    assert result["exact_match"] == 0.0
    assert result["invalid_rate"] == 1.0


def test_judge_of_no_answer_is_invalid_for_every_kind():
    for kind in AnswerKind:
        result = judge(kind, None, "anything")
        assert not result.valid and not result.correct


# --- IUPAC names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "predicted",
    [
        "2-methylpropan-1-ol",
        "2-Methylpropan-1-ol",
        "  2-methylpropan-1-OL ",
        "2-methyl propan-1-ol",
        "2\u2010methylpropan\u20131\u2011ol",
    ],
)
def test_iupac_names_compare_after_normalising_case_whitespace_and_dashes(predicted):
    result = judge(IUPAC, predicted, "2-methylpropan-1-ol")
    assert result.valid and result.correct


@pytest.mark.parametrize("predicted", ["2-methylpropan-2-ol", "butan-1-ol", "2,2-dimethylpropan-1-ol"])
def test_different_iupac_names_do_not_match(predicted):
    result = judge(IUPAC, predicted, "2-methylpropan-1-ol")
    assert result.valid and not result.correct


def test_split_match_compares_the_semicolon_separated_parts_in_any_order():
    gold = "sodium;2-hydroxypropanoate"
    records = [record("s2i", "iupac", gold)] * 4
    predictions = [
        answer("iupac", "sodium;2-hydroxypropanoate"),  # exact, and so split match
        answer("iupac", "2-Hydroxypropanoate; sodium"),  # parts swapped: split match only
        answer("iupac", "sodium;propanoate"),  # one part wrong: neither
        answer("iupac", "sodium 2-hydroxypropanoate"),  # the parts run together: neither
    ]
    assert [judge(IUPAC, extract_answer(p, *TAGS["iupac"]), gold).split_match for p in predictions] == [
        True,
        True,
        False,
        False,
    ]
    metrics = score(records, predictions)["tasks"]["s2i"]
    assert metrics["exact_match"] == pytest.approx(1 / 4)
    assert metrics["split_match"] == pytest.approx(2 / 4)


def test_split_match_of_a_one_part_name_is_exact_match():
    records = [record("s2i", "iupac", "2-methylpropan-1-ol")] * 3
    predictions = [answer("iupac", "2-Methylpropan-1-ol"), answer("iupac", "butan-1-ol"), "no tags"]
    metrics = score(records, predictions)["tasks"]["s2i"]
    assert metrics["split_match"] == metrics["exact_match"] == pytest.approx(1 / 3)
    assert metrics["invalid_rate"] == pytest.approx(1 / 3)


# --- numbers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "predicted, gold, correct",
    [
        ("1.50", "1.50", True),
        ("1.5", "1.50", True),
        ("1.504", "1.50", True),
        ("1.496", "1.50", True),
        ("1.506", "1.50", False),
        ("1.49", "1.50", False),
        ("-0.31", "-0.31", True),
        ("0.31", "-0.31", False),
        ("2", "2", True),
        ("2.4", "2", True),
        ("2.6", "2", False),
        ("1.3", "1.2", False),
        ("1.24", "1.2", True),
    ],
)
def test_numbers_match_at_the_precision_of_the_label(predicted, gold, correct):
    result = judge(NUMBER, predicted, gold)
    assert result.valid
    assert result.correct is correct
    assert result.value == float(predicted)


@pytest.mark.parametrize("predicted", ["abc", "1,5", "nan", "inf", "-inf", "1.5 units", "--1"])
def test_non_numbers_are_invalid(predicted):
    result = judge(NUMBER, predicted, "1.50")
    assert not result.valid and not result.correct and result.value is None


def test_rmse_is_over_valid_answers_only():
    records = [record("logp", "number", gold) for gold in ("1.00", "2.00", "3.00", "-1.00")]
    predictions = [answer("number", "1.00"), answer("number", "4.00"), answer("number", "abc"), "no tags at all"]
    metrics = score(records, predictions)["tasks"]["logp"]
    assert metrics["kind"] == "number"
    assert metrics["n"] == 4
    assert metrics["exact_match"] == pytest.approx(1 / 4)
    assert metrics["invalid_rate"] == pytest.approx(2 / 4)
    # errors 0 and 2 over the two valid answers: sqrt((0 + 4) / 2)
    assert metrics["rmse"] == pytest.approx(math.sqrt(2))


def test_rmse_is_none_when_no_answer_is_valid():
    metrics = score([record("logp", "number", "1.00")], ["I don't know"])["tasks"]["logp"]
    assert metrics["rmse"] is None
    assert metrics["invalid_rate"] == 1.0


# --- booleans ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "predicted, gold, correct",
    [
        ("Yes", "Yes", True),
        ("yes", "Yes", True),
        ("TRUE", "Yes", True),
        ("true", "Yes", True),
        ("No", "Yes", False),
        ("false", "No", True),
        ("no", "No", True),
        ("Yes", "No", False),
        ("false", "Yes", False),
    ],
)
def test_booleans_read_yes_no_true_false(predicted, gold, correct):
    result = judge(BOOLEAN, predicted, gold)
    assert result.valid and result.correct is correct


@pytest.mark.parametrize("predicted", ["maybe", "Y", "1", "yes!"])
def test_other_words_are_invalid_booleans(predicted):
    result = judge(BOOLEAN, predicted, "Yes")
    assert not result.valid and not result.correct


def test_boolean_tasks_report_accuracy():
    records = [record("ro3", "boolean", gold) for gold in ("Yes", "No", "No", "Yes")]
    predictions = [answer("boolean", "Yes"), answer("boolean", "true"), answer("boolean", "No"), "nothing"]
    metrics = score(records, predictions)["tasks"]["ro3"]
    assert metrics["kind"] == "boolean"
    assert metrics["accuracy"] == metrics["exact_match"] == pytest.approx(2 / 4)
    assert metrics["invalid_rate"] == pytest.approx(1 / 4)
    assert "rmse" not in metrics


def confusion_case(true_pos: int, false_pos: int, false_neg: int, true_neg: int) -> tuple[list[dict], list[str]]:
    """Records and answers with the given confusion matrix ("Yes" is the positive class)."""
    pairs = [("Yes", "Yes")] * true_pos + [("Yes", "No")] * false_pos + [("No", "Yes")] * false_neg
    pairs += [("No", "No")] * true_neg
    return [record("ro3", "boolean", gold) for _, gold in pairs], [answer("boolean", said) for said, _ in pairs]


def test_f1_and_mcc_on_a_hand_computed_confusion_matrix():
    records, predictions = confusion_case(true_pos=3, false_pos=1, false_neg=2, true_neg=4)
    metrics = score(records, predictions)["tasks"]["ro3"]
    assert metrics["accuracy"] == pytest.approx(7 / 10)
    # precision 3/4, recall 3/5: F1 = 2 * 3 / (2 * 3 + 1 + 2)
    assert metrics["f1"] == pytest.approx(6 / 9)
    # (3 * 4 - 1 * 2) / sqrt((3 + 1) * (3 + 2) * (4 + 1) * (4 + 2))
    assert metrics["mcc"] == pytest.approx(10 / math.sqrt(600))


@pytest.mark.parametrize(
    "matrix, f1, mcc",
    [
        ((2, 0, 0, 3), 1.0, 1.0),  # perfect
        ((0, 3, 2, 0), 0.0, -1.0),  # always wrong
        ((0, 0, 2, 3), 0.0, 0.0),  # always "No": no true positive, an empty column
        ((2, 3, 0, 0), 4 / 7, 0.0),  # always "Yes": an empty column
    ],
)
def test_f1_and_mcc_at_the_extremes(matrix, f1, mcc):
    metrics = score(*confusion_case(*matrix))["tasks"]["ro3"]
    assert metrics["f1"] == pytest.approx(f1)
    assert metrics["mcc"] == pytest.approx(mcc)


def test_f1_and_mcc_count_valid_answers_only():
    records, predictions = confusion_case(true_pos=1, false_pos=0, false_neg=1, true_neg=1)
    records += [record("ro3", "boolean", "Yes"), record("ro3", "boolean", "No")]
    predictions += [answer("boolean", "maybe"), "no tags"]
    metrics = score(records, predictions)["tasks"]["ro3"]
    assert metrics["accuracy"] == pytest.approx(2 / 5)  # invalid answers count as wrong here ...
    assert metrics["invalid_rate"] == pytest.approx(2 / 5)
    assert metrics["f1"] == pytest.approx(2 / 3)  # ... and are left out here: 2 * 1 / (2 * 1 + 0 + 1)
    assert metrics["mcc"] == pytest.approx(1 / 2)  # (1 * 1 - 0) / sqrt(1 * 2 * 1 * 2)


def test_f1_and_mcc_are_none_without_a_valid_answer():
    metrics = score([record("ro3", "boolean", "Yes")], ["nothing"])["tasks"]["ro3"]
    assert metrics["f1"] is None and metrics["mcc"] is None


# --- score() -----------------------------------------------------------------------------------


def test_score_per_task_and_macro_means():
    records = [
        record("s2f", "formula", "C2H6O"),
        record("s2f", "formula", "CH4"),
        record("s2f", "formula", "C6H6"),
        record("i2s", "smiles", "CCO"),
        record("ro3", "boolean", "Yes"),
        record("ro3", "boolean", "No"),
    ]
    predictions = [
        answer("formula", "H6C2O"),  # correct
        answer("formula", "CH3"),  # wrong
        "C6H6 without tags",  # invalid
        answer("smiles", "OCC"),  # correct
        answer("boolean", "No"),  # wrong
        answer("boolean", "nope"),  # invalid
    ]
    result = score(records, predictions)
    tasks = result["tasks"]
    assert list(tasks) == ["i2s", "ro3", "s2f"]
    assert tasks["s2f"] == {
        "kind": "formula",
        "n": 3,
        "exact_match": pytest.approx(1 / 3),
        "invalid_rate": pytest.approx(1 / 3),
    }
    assert tasks["i2s"] == {
        "kind": "smiles",
        "n": 1,
        "exact_match": 1.0,
        "invalid_rate": 0.0,
        "tanimoto_maccs": 1.0,
        "tanimoto_rdkit": 1.0,
        "tanimoto_morgan": 1.0,
    }
    assert tasks["ro3"]["exact_match"] == 0.0 and tasks["ro3"]["invalid_rate"] == 0.5
    overall = result["overall"]
    assert overall["n"] == 6
    # Macro means over the three tasks, not over the six records.
    assert overall["exact_match"] == pytest.approx((1 / 3 + 1.0 + 0.0) / 3)
    assert overall["invalid_rate"] == pytest.approx((1 / 3 + 0.0 + 0.5) / 3)


def test_score_of_nothing_is_zero_and_lengths_must_agree():
    assert score([], []) == {"tasks": {}, "overall": {"n": 0, "exact_match": 0.0, "invalid_rate": 0.0}}
    with pytest.raises(ValueError):
        score([record("s2f", "formula", "CH4")], [])


def test_untagged_text_answers_are_compared_whole_with_whitespace_normalised():
    records = [
        {
            "task": "caption",
            "raw_output": "The molecule is  an alcohol.",
            "output_core_tag_left": None,
            "output_core_tag_right": None,
        }
    ] * 2
    metrics = score(records, ["  The molecule is an\nalcohol. ", "The molecule is a ketone."])["tasks"]["caption"]
    assert metrics["kind"] == "text"
    assert metrics["exact_match"] == 0.5 and metrics["invalid_rate"] == 0.0


# --- extract_answer ----------------------------------------------------------------------------


def test_extract_answer_takes_the_first_tagged_core_stripped():
    text = "First <SMILES> CCO </SMILES>, then <SMILES> CCC </SMILES>."
    assert extract_answer(text, "<SMILES>", "</SMILES>") == "CCO"
    assert extract_answer("<SMILES>\n c1ccccc1\n</SMILES>", "<SMILES>", "</SMILES>") == "c1ccccc1"
    assert extract_answer("<NUMBER> 1.5 </NUMBER> <SMILES> C </SMILES>", "<SMILES>", "</SMILES>") == "C"


def test_extract_answer_first_core_decides_the_score():
    records = [record("i2s", "smiles", "CCO")]
    assert score(records, ["<SMILES> CCO </SMILES> or <SMILES> CCC </SMILES>"])["tasks"]["i2s"]["exact_match"] == 1.0
    assert score(records, ["<SMILES> CCC </SMILES> or <SMILES> CCO </SMILES>"])["tasks"]["i2s"]["exact_match"] == 0.0


def test_extract_answer_without_tags_is_the_whole_text():
    assert extract_answer("  a caption \n", None, None) == "a caption"
    assert extract_answer("   ", None, None) is None


def test_answer_kind_follows_the_output_tag():
    assert answer_kind("<SMILES>") is SMILES
    assert answer_kind("<MOLFORMULA>") is FORMULA
    assert answer_kind("<IUPAC>") is IUPAC
    assert answer_kind("<NUMBER>") is NUMBER
    assert answer_kind("<BOOLEAN>") is BOOLEAN
    assert answer_kind("<SELFIES>") is TEXT
    assert answer_kind(None) is TEXT
