"""The offline tasks: SMolInstruct's four name conversions plus two RDKit-labelled properties
(Crippen LogP, rule of three).

Each task turns one molecule into one record through one of several instruction templates
(`<INPUT>` and `<OUTPUT>` mark where the tagged cores go, as in SMolInstruct's templates).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from chemfl.data_prep.schema import make_record


@dataclass(frozen=True)
class Molecule:
    """One compound with every label the offline tasks need, computed once."""

    smiles: str  # RDKit canonical
    iupac: str
    formula: str  # Hill order, from RDKit
    logp: float  # Wildman-Crippen LogP
    fragment_like: bool  # passes the rule of three


@dataclass(frozen=True)
class OfflineTask:
    name: str
    input_tag: tuple[str, str]
    output_tag: tuple[str, str]
    templates: tuple[tuple[str, str], ...]  # (input template, output template)
    core_pair: Callable[[Molecule], tuple[str, str]]  # molecule -> (raw_input, raw_output)

    def record(self, molecule: Molecule, rng: random.Random) -> dict[str, str | None]:
        raw_input, raw_output = self.core_pair(molecule)
        input_template, output_template = self.templates[rng.randrange(len(self.templates))]
        return make_record(
            input_template, output_template, raw_input, raw_output, self.name, self.input_tag, self.output_tag
        )


SMILES_TAG = ("<SMILES>", "</SMILES>")
IUPAC_TAG = ("<IUPAC>", "</IUPAC>")
FORMULA_TAG = ("<MOLFORMULA>", "</MOLFORMULA>")
NUMBER_TAG = ("<NUMBER>", "</NUMBER>")
BOOLEAN_TAG = ("<BOOLEAN>", "</BOOLEAN>")


def format_number(value: float) -> str:
    text = f"{value:.2f}"
    return "0.00" if text == "-0.00" else text


OFFLINE_TASKS: tuple[OfflineTask, ...] = (
    OfflineTask(
        "name_conversion-i2s",
        IUPAC_TAG,
        SMILES_TAG,
        (
            ("Could you provide the SMILES for <INPUT> ?", "Of course. It's <OUTPUT> ."),
            ("Translate the IUPAC name <INPUT> into a SMILES string.", "<OUTPUT>"),
            ("What is the SMILES representation of <INPUT> ?", "The SMILES is <OUTPUT> ."),
            ("Write the SMILES notation of the compound named <INPUT> .", "<OUTPUT>"),
        ),
        lambda m: (m.iupac, m.smiles),
    ),
    OfflineTask(
        "name_conversion-s2i",
        SMILES_TAG,
        IUPAC_TAG,
        (
            ("Translate the given SMILES formula of a molecule <INPUT> into its IUPAC name.", "<OUTPUT>"),
            ("What is the IUPAC name of <INPUT> ?", "Its IUPAC name is <OUTPUT> ."),
            ("Name the molecule <INPUT> according to IUPAC rules.", "<OUTPUT>"),
            ("Give the systematic IUPAC name for the structure <INPUT> .", "Sure. It is <OUTPUT> ."),
        ),
        lambda m: (m.smiles, m.iupac),
    ),
    OfflineTask(
        "name_conversion-i2f",
        IUPAC_TAG,
        FORMULA_TAG,
        (
            ("What is the molecular formula of the compound with this IUPAC name <INPUT> ?", "<OUTPUT>"),
            ("Give the molecular formula of <INPUT> .", "The molecular formula is <OUTPUT> ."),
            ("Which molecular formula corresponds to the IUPAC name <INPUT> ?", "<OUTPUT>"),
        ),
        lambda m: (m.iupac, m.formula),
    ),
    OfflineTask(
        "name_conversion-s2f",
        SMILES_TAG,
        FORMULA_TAG,
        (
            ("Given the SMILES representation <INPUT>, what would be its molecular formula?", "It is <OUTPUT> ."),
            ("Compute the molecular formula of the molecule <INPUT> .", "<OUTPUT>"),
            ("What molecular formula does <INPUT> have?", "Its molecular formula is <OUTPUT> ."),
        ),
        lambda m: (m.smiles, m.formula),
    ),
    OfflineTask(
        "property_prediction-logp",
        SMILES_TAG,
        NUMBER_TAG,
        (
            ("Estimate the octanol-water partition coefficient (Crippen LogP) of <INPUT> .", "<OUTPUT>"),
            ("What is the LogP of the molecule <INPUT> ?", "Its LogP is <OUTPUT> ."),
            ("How lipophilic is <INPUT> ? Give its Wildman-Crippen LogP.", "The LogP is <OUTPUT> ."),
        ),
        lambda m: (m.smiles, format_number(m.logp)),
    ),
    OfflineTask(
        "property_prediction-ro3",
        SMILES_TAG,
        BOOLEAN_TAG,
        (
            ("Is <INPUT> fragment-like by the rule of three?", "<OUTPUT>"),
            (
                "Does the molecule <INPUT> pass the rule of three for fragment screening "
                "(MW <= 300, LogP <= 3, at most 3 H-bond donors, 3 acceptors and 3 rotatable bonds)?",
                "<OUTPUT>",
            ),
            ("Check the rule of three for <INPUT> . Is it a fragment-like compound?", "The answer is <OUTPUT> ."),
        ),
        lambda m: (m.smiles, "Yes" if m.fragment_like else "No"),
    ),
)

OFFLINE_TASKS_BY_NAME: dict[str, OfflineTask] = {task.name: task for task in OFFLINE_TASKS}
