"""The offline tasks: SMolInstruct's four name conversions plus two RDKit-labelled properties
(Crippen LogP, rule of three), one record per molecule; and SMolInstruct's two reaction tasks,
forward synthesis and retrosynthesis, one record per RDKit-templated reaction.

Each task turns one molecule (or reaction) into one record through one of several instruction
templates (`<INPUT>` and `<OUTPUT>` mark where the tagged cores go, as in SMolInstruct's templates).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from chemfl.data_prep.reactions import Reaction
from chemfl.data_prep.schema import make_record


@dataclass(frozen=True)
class Molecule:
    """One compound with every label the offline tasks need, computed once."""

    smiles: str  # RDKit canonical
    iupac: str
    formula: str  # Hill order, from RDKit
    logp: float  # Wildman-Crippen LogP
    fragment_like: bool  # passes the rule of three


Item = TypeVar("Item", Molecule, Reaction)


@dataclass(frozen=True)
class OfflineTask(Generic[Item]):
    name: str
    input_tag: tuple[str, str]
    output_tag: tuple[str, str]
    templates: tuple[tuple[str, str], ...]  # (input template, output template)
    core_pair: Callable[[Item], tuple[str, str]]  # molecule or reaction -> (raw_input, raw_output)

    def record(self, item: Item, rng: random.Random) -> dict[str, str | None]:
        raw_input, raw_output = self.core_pair(item)
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


MOLECULE_TASKS: tuple[OfflineTask[Molecule], ...] = (
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

# SMolInstruct's wording; both sides are SMILES, several molecules dot-joined ("A.B").
REACTION_TASKS: tuple[OfflineTask[Reaction], ...] = (
    OfflineTask(
        "forward_synthesis",
        SMILES_TAG,
        SMILES_TAG,
        (
            (
                "<INPUT> Based on the reactants given above, suggest a possible product.",
                "A possible product can be <OUTPUT> .",
            ),
            (
                "Based on the given reactants: <INPUT>, what product could potentially be produced?",
                "The product can be <OUTPUT> .",
            ),
            ("Given the following reactants, please provide a possible product. <INPUT>", "<OUTPUT>"),
            ("What is the main product of the reaction between <INPUT> ?", "The main product is <OUTPUT> ."),
        ),
        lambda r: (r.reactants_smiles, r.product),
    ),
    OfflineTask(
        "retrosynthesis",
        SMILES_TAG,
        SMILES_TAG,
        (
            (
                "Identify possible reactants that could have been used to create the specified product. <INPUT>",
                "<OUTPUT>",
            ),
            (
                "Given the following product, please provide possible reactants. <INPUT>",
                "Possible reactants: <OUTPUT> .",
            ),
            (
                "With the provided product <INPUT>, recommend some likely reactants that were used to produce it.",
                "<OUTPUT>",
            ),
            (
                "<INPUT> Given the product provided, propose some possible reactants that could have been "
                "employed in its formation.",
                "Here are possible reactants: <OUTPUT> .",
            ),
        ),
        lambda r: (r.product, r.reactants_smiles),
    ),
)

OFFLINE_TASKS: tuple[OfflineTask, ...] = MOLECULE_TASKS + REACTION_TASKS
OFFLINE_TASKS_BY_NAME: dict[str, OfflineTask] = {task.name: task for task in OFFLINE_TASKS}
# What data.tasks = "all" builds: the molecule tasks. Reactions are built only when named, so
# builds made before they existed keep their content.
DEFAULT_OFFLINE_TASKS: tuple[str, ...] = tuple(task.name for task in MOLECULE_TASKS)
