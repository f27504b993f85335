"""Reaction tasks: RDKit templates on the offline molecules, forward synthesis and retrosynthesis."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from rdkit import Chem
from rdkit.Chem import rdChemReactions

from chemfl.data_prep import chem
from chemfl.data_prep.reactions import (
    MAX_PRODUCT_HEAVY_ATOMS,
    REACTION_CLASSES,
    REACTION_CLASSES_BY_NAME,
    Reaction,
    find_reactions,
    reactive_group,
    run_template,
)
from chemfl.data_prep.schema import FIELDS
from chemfl.data_prep.sources.offline import load_offline
from tests.conftest import OFFLINE_TASKS

REACTION_TASKS = ("forward_synthesis", "retrosynthesis")


def canonical(smiles: str) -> str:
    return Chem.MolToSmiles(Chem.MolFromSmiles(smiles))


def products_of(smarts: str, reactants: tuple[str, ...]) -> set[str]:
    """What RDKit itself makes of a reaction SMARTS and reactants, as canonical SMILES."""
    reaction = rdChemReactions.ReactionFromSmarts(smarts)
    products = set()
    for (product,) in reaction.RunReactants([Chem.MolFromSmiles(smiles) for smiles in reactants]):
        Chem.SanitizeMol(product)
        products.add(canonical(Chem.MolToSmiles(product)))
    return products


# --- the templates on reactions a chemist can check ----------------------------------------------


@pytest.mark.parametrize(
    "reaction_class, reactants, product",
    [
        ("amide coupling", ("CC(=O)O", "CCN"), "CCNC(C)=O"),  # N-ethylacetamide
        ("amide coupling", ("OC(=O)c1ccccc1", "C1CCNCC1"), "O=C(c1ccccc1)N1CCCCC1"),  # secondary amine
        ("amide coupling", ("CC(=O)O", "Nc1ccccc1"), "CC(=O)Nc1ccccc1"),  # acetanilide
        ("Fischer esterification", ("OC(=O)c1ccccc1", "CCO"), "CCOC(=O)c1ccccc1"),  # ethyl benzoate
        # The alcohol's stereocentre survives: (S)-butan-2-yl benzoate.
        ("Fischer esterification", ("OC(=O)c1ccccc1", "C[C@H](O)CC"), "CC[C@H](C)OC(=O)c1ccccc1"),
        ("reductive amination", ("CC(C)=O", "NCc1ccccc1"), "CC(C)NCc1ccccc1"),  # ketone
        ("reductive amination", ("O=Cc1ccccc1", "C1CCNCC1"), "c1ccc(CN2CCCCC2)cc1"),  # aldehyde
        ("Williamson ether synthesis", ("Oc1ccccc1", "CCBr"), "CCOc1ccccc1"),  # phenetole
        ("Williamson ether synthesis", ("Oc1ccccc1", "CI"), "COc1ccccc1"),  # anisole
    ],
)
def test_each_template_makes_the_textbook_product(reaction_class, reactants, product):
    assert run_template(REACTION_CLASSES_BY_NAME[reaction_class], reactants) == canonical(product)


@pytest.mark.parametrize(
    "smiles, group",
    [
        ("CCC(=O)O", "carboxylic acid"),
        ("CCCN", "amine"),
        ("CCNCC", "amine"),
        ("Nc1ccccc1", "amine"),
        ("CCCO", "alcohol"),
        ("CC(C)=O", "aldehyde or ketone"),
        ("CCC=O", "aldehyde or ketone"),
        ("Oc1ccccc1", "phenol"),
        ("CCCBr", "alkyl halide"),
        ("CC(=O)N", None),  # an amide's nitrogen does not couple
        ("CCN(C)C", None),  # a tertiary amine has no N-H
        ("NCC(=O)O", None),  # two groups: an amino acid would couple with itself
        ("OC(=O)CCC(=O)O", None),  # two acid sites: which one reacts?
        ("CC(=O)Cl", None),  # an acyl chloride would acylate
        ("CCS", None),  # a thiol would compete
        ("OC(=O)O", None),  # carbonic acid is no carboxylic acid
        ("CC(C)(C)Br", None),  # tertiary: no SN2
        ("Brc1ccccc1", None),  # aryl halide: no SN2
        ("CC(O)OC", None),  # a hemiacetal is no alcohol
        ("c1ccncc1", None),
    ],
)
def test_reactive_group_needs_exactly_one_site(smiles, group):
    assert reactive_group(smiles) == group


def test_find_reactions_takes_turns_and_uses_each_molecule_once():
    molecules = [
        "CC(=O)O",
        "CCN",
        "CCO",
        "CC(C)=O",
        "NCc1ccccc1",
        "Oc1ccccc1",
        "CCBr",
        "OC(=O)c1ccccc1",
        "CCCO",  # no acid is left for it
        "NCC(=O)O",  # no single reactive site
    ]
    assert find_reactions(molecules) == [
        Reaction("amide coupling", ("CC(=O)O", "CCN"), canonical("CCNC(C)=O")),
        Reaction("Fischer esterification", ("OC(=O)c1ccccc1", "CCO"), canonical("CCOC(=O)c1ccccc1")),
        Reaction("reductive amination", ("CC(C)=O", "NCc1ccccc1"), canonical("CC(C)NCc1ccccc1")),
        Reaction("Williamson ether synthesis", ("Oc1ccccc1", "CCBr"), canonical("CCOc1ccccc1")),
    ]
    # The order given decides the pairs: the same molecules in the same order, the same reactions.
    assert find_reactions(molecules[::-1]) != find_reactions(molecules)
    assert find_reactions(molecules[::-1]) == find_reactions(molecules[::-1])


def test_products_stay_within_the_size_limit():
    # Every template drops one heavy atom (the acid's OH, the carbonyl O, the halogen).
    assert [reaction_class.atoms_lost for reaction_class in REACTION_CLASSES] == [1, 1, 1, 1]
    assert find_reactions(["C" * 26 + "C(=O)O", "CCN"]) == []  # 29 + 3 - 1 = 31 heavy atoms
    largest = find_reactions(["C" * 25 + "C(=O)O", "CCN"])  # 28 + 3 - 1 = 30
    assert [Chem.MolFromSmiles(r.product).GetNumHeavyAtoms() for r in largest] == [MAX_PRODUCT_HEAVY_ATOMS]


def test_reactants_smiles_is_canonical_and_dot_joined():
    reaction = Reaction("amide coupling", ("CC(=O)O", "CCN"), "CCNC(C)=O")
    assert reaction.reactants_smiles == canonical("CC(=O)O.CCN")
    assert sorted(reaction.reactants_smiles.split(".")) == sorted(reaction.reactants)


# --- the offline source --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def with_reactions():
    return load_offline((*OFFLINE_TASKS, *REACTION_TASKS), 60, 42, 0.1, 0.05)


def drawn_molecules(records: list[dict]) -> list[str]:
    """The molecules of a build, in draw order (each has one I2S record)."""
    return [r["raw_output"] for r in records if r["task"] == "name_conversion-i2s"]


def test_reaction_records_hold_reactions_of_the_drawn_molecules(with_reactions):
    records, info = with_reactions
    reactions = find_reactions(drawn_molecules(records))
    assert reactions, "60 molecules hold at least one reactant pair"
    assert info["reactions"] == dict(Counter(r.reaction_class for r in reactions))
    forward = [(r["raw_input"], r["raw_output"]) for r in records if r["task"] == "forward_synthesis"]
    retro = [(r["raw_output"], r["raw_input"]) for r in records if r["task"] == "retrosynthesis"]
    assert forward == retro == [(reaction.reactants_smiles, reaction.product) for reaction in reactions]
    assert all(list(r) == list(FIELDS) for r in records)
    # Adding reaction tasks leaves the molecule records as they were, but for their splits (a
    # reaction joins its reactants' split groups).
    without, _ = load_offline(OFFLINE_TASKS, 60, 42, 0.1, 0.05)
    unsplit = [{**r, "split": None} for r in records if r["task"] in OFFLINE_TASKS]
    assert unsplit == [{**r, "split": None} for r in without]


def test_running_the_stated_template_on_the_reactants_yields_the_product(with_reactions):
    reactions = find_reactions(drawn_molecules(with_reactions[0]))
    for reaction in reactions:
        smarts = REACTION_CLASSES_BY_NAME[reaction.reaction_class].smarts
        assert products_of(smarts, reaction.reactants) == {reaction.product}, reaction
        assert reaction.product == canonical(reaction.product)
        assert Chem.MolFromSmiles(reaction.product).GetNumHeavyAtoms() <= MAX_PRODUCT_HEAVY_ATOMS
    used = [smiles for reaction in reactions for smiles in reaction.reactants]
    assert len(used) == len(set(used)), "a molecule is a reactant at most once"


def test_retrosynthesis_answers_are_decompositions_that_reform_the_product(with_reactions):
    """From the records alone: the answer's two molecules, in some order, re-form the product by one
    of the reaction classes."""
    retro = [r for r in with_reactions[0] if r["task"] == "retrosynthesis"]
    for record in retro:
        product, reactants = record["raw_input"], record["raw_output"]
        assert reactants == canonical(reactants) and product == canonical(product)
        fragments = reactants.split(".")
        assert len(fragments) == 2
        reforming = [
            reaction_class.name
            for reaction_class in REACTION_CLASSES
            for order in itertools.permutations(fragments)
            if product in products_of(reaction_class.smarts, order)
        ]
        assert len(reforming) == 1, (record, reforming)


def test_reaction_records_are_tagged_smiles_on_both_sides(with_reactions):
    for record in with_reactions[0]:
        if record["task"] not in REACTION_TASKS:
            continue
        for side in ("input", "output"):
            assert record[f"{side}_core_tag_left"] == "<SMILES>" and record[f"{side}_core_tag_right"] == "</SMILES>"
        assert f"<SMILES> {record['raw_input']} </SMILES>" in record["input"]
        assert f"<SMILES> {record['raw_output']} </SMILES>" in record["output"]
        assert chem.canonical_smiles(record["raw_input"]) and chem.canonical_smiles(record["raw_output"])


def test_a_reaction_shares_the_split_of_its_reactant_molecules(with_reactions):
    records = with_reactions[0]
    split_of_molecule = {r["raw_output"]: r["split"] for r in records if r["task"] == "name_conversion-i2s"}
    for reaction in find_reactions(drawn_molecules(records)):
        splits = {r["split"] for r in records if r["task"] in REACTION_TASKS and r["raw_input"] == reaction.product}
        splits |= {split_of_molecule[smiles] for smiles in reaction.reactants}
        assert len(splits) == 1, reaction


def test_reaction_tasks_alone(with_reactions):
    records, info = load_offline(list(REACTION_TASKS), 60, 42, 0.1, 0.05)
    assert {r["task"] for r in records} == set(REACTION_TASKS)
    assert info["reactions"] == with_reactions[1]["reactions"]
    assert [r["raw_input"] for r in records] == [
        r["raw_input"] for r in with_reactions[0] if r["task"] in REACTION_TASKS
    ]
