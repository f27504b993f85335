"""An offline SMolInstruct-style set built from PubChem identifiers shipped in `chemicals`.

Needs no network: the PubChem table (~71k compounds: formula, SMILES, InChIKey, IUPAC name) is
package data of `chemicals`, and RDKit computes every label exactly, reaction products included
(reaction templates applied to pairs of the drawn molecules, see `reactions`).
"""

from __future__ import annotations

import importlib.util
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from chemfl.data_prep import chem
from chemfl.data_prep.reactions import find_reactions
from chemfl.data_prep.splits import assign_splits
from chemfl.data_prep.tasks import MOLECULE_TASKS, OFFLINE_TASKS_BY_NAME, REACTION_TASKS, Molecule
from chemfl.errors import ChemFLError

PUBCHEM_TABLE = "chemical identifiers pubchem large.tsv"

# Molecules a 135M-parameter model can read in a few dozen tokens, with an organic-chemistry
# vocabulary: single neutral fragments, 3-30 heavy atoms, names of at most 60 characters.
ALLOWED_ELEMENTS = frozenset({"C", "H", "N", "O", "S", "P", "F", "Cl", "Br", "I"})
MIN_HEAVY_ATOMS, MAX_HEAVY_ATOMS = 3, 30
MAX_NAME_LENGTH = 60


def pubchem_table_path() -> Path:
    spec = importlib.util.find_spec("chemicals")
    if spec is None or not spec.submodule_search_locations:
        raise ChemFLError("the 'chemicals' package is not installed; run: pip install chemicals")
    path = Path(next(iter(spec.submodule_search_locations))) / "Identifiers" / PUBCHEM_TABLE
    if not path.is_file():
        raise ChemFLError(f"'chemicals' has no PubChem table at {path}; reinstall chemicals>=1.3")
    return path


def molecule_from_row(columns: Sequence[str]) -> Molecule | None:
    """A Molecule from one PubChem row, or None when it fails a filter."""
    if len(columns) < 8:
        return None
    pubchem_formula, smiles, iupac = columns[2], columns[4], columns[7].strip()
    if not iupac or len(iupac) > MAX_NAME_LENGTH or "." in smiles:
        return None
    mol = chem.mol_from_smiles(smiles)
    if mol is None or not MIN_HEAVY_ATOMS <= mol.GetNumHeavyAtoms() <= MAX_HEAVY_ATOMS:
        return None
    elements = {atom.GetSymbol() for atom in mol.GetAtoms()}
    if "C" not in elements or not elements <= ALLOWED_ELEMENTS:
        return None
    if any(atom.GetFormalCharge() for atom in mol.GetAtoms()):
        return None
    formula = chem.hill_formula(mol)
    # PubChem's formula must agree with RDKit's reading of the SMILES: guards against rows
    # whose SMILES and name describe different things.
    if formula != pubchem_formula:
        return None
    return Molecule(
        smiles=chem.canonical_smiles(smiles),
        iupac=iupac,
        formula=formula,
        logp=chem.crippen_logp(mol),
        fragment_like=chem.passes_rule_of_three(mol),
    )


def iter_molecules(table: Path, seed: int) -> Iterator[Molecule]:
    """Molecules of the table in a seeded random order, unique by InChIKey and by name."""
    with table.open(encoding="utf-8") as handle:
        rows = [line.rstrip("\n").split("\t") for line in handle if line.strip()]
    random.Random(seed).shuffle(rows)
    seen: set[str] = set()
    for columns in rows:
        molecule = molecule_from_row(columns)
        if molecule is None:
            continue
        identities = (chem.inchi_key(molecule.smiles), chem.normalize_iupac(molecule.iupac))
        if any(identity in seen for identity in identities):
            continue
        seen.update(identities)
        yield molecule


def load_offline(
    tasks: Sequence[str],
    max_molecules: int,
    seed: int,
    test_fraction: float,
    validation_fraction: float,
    on_molecule: Callable[[], None] = lambda: None,
) -> tuple[list[dict], dict]:
    """Records for `tasks` (one per molecule task per molecule, one per reaction task per reaction
    among those molecules), split by molecule, and a description.

    The split is decided per molecule here, where the molecule is known: a task that only names
    it (I2F) and one that only draws it (S2F) then share a split even when no task links the two.
    A reaction shares the split of both its reactant molecules.
    """
    requested = [OFFLINE_TASKS_BY_NAME[task] for task in tasks]
    molecule_tasks = [task for task in requested if task in MOLECULE_TASKS]
    reaction_tasks = [task for task in requested if task in REACTION_TASKS]
    table = pubchem_table_path()
    rng = random.Random(seed)
    records: list[dict] = []
    groups: list[list[int]] = []
    group_of: dict[str, int] = {}  # canonical SMILES -> its molecule's group
    for molecule in iter_molecules(table, seed):
        if len(groups) >= max_molecules:
            break
        start = len(records)
        records.extend(task.record(molecule, rng) for task in molecule_tasks)
        group_of[molecule.smiles] = len(groups)
        groups.append(list(range(start, len(records))))
        on_molecule()
    if len(groups) < max_molecules:
        raise ChemFLError(
            f"the PubChem table holds only {len(groups)} usable molecules; set data.max-molecules <= {len(groups)}"
        )
    source = {
        "name": "offline",
        "table": f"chemicals/Identifiers/{PUBCHEM_TABLE}",
        "molecules": len(groups),
    }
    if reaction_tasks:
        reactions = find_reactions(list(group_of))
        if not reactions:
            raise ChemFLError(
                f"the {max_molecules} molecules drawn hold no reactant pairs for the reaction tasks; "
                "raise data.max-molecules"
            )
        for reaction in reactions:
            start = len(records)
            records.extend(task.record(reaction, rng) for task in reaction_tasks)
            first, second = (group_of[smiles] for smiles in reaction.reactants)
            # Each molecule is a reactant at most once, so merging never chains groups together.
            groups[first] += groups[second] + list(range(start, len(records)))
            groups[second] = []
        source["reactions"] = dict(sorted(Counter(reaction.reaction_class for reaction in reactions).items()))
    assign_splits(records, test_fraction, validation_fraction, seed, groups=[group for group in groups if group])
    return records, source
