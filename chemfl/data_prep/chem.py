"""RDKit helpers: canonical forms of molecules, formulas and names, quiet on bad input."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

from rdkit import Chem, DataStructs, RDLogger
from rdkit.Chem import Crippen, Descriptors, Lipinski, MACCSkeys, rdFingerprintGenerator, rdMolDescriptors

# RDKit prints every parse failure to stderr; invalid SMILES are expected input here.
RDLogger.DisableLog("rdApp.*")


def mol_from_smiles(smiles: str | None) -> Chem.Mol | None:
    if not smiles or not smiles.strip():
        return None
    return Chem.MolFromSmiles(smiles.strip())


@lru_cache(maxsize=200_000)
def canonical_smiles(smiles: str) -> str | None:
    """RDKit's canonical isomeric SMILES, or None when RDKit cannot parse it."""
    mol = mol_from_smiles(smiles)
    return None if mol is None else Chem.MolToSmiles(mol)


@lru_cache(maxsize=200_000)
def inchi_key(smiles: str) -> str | None:
    """Standard InChIKey (tautomer-aware identity), or None when RDKit cannot parse or key it."""
    mol = mol_from_smiles(smiles)
    if mol is None:
        return None
    return Chem.MolToInchiKey(mol) or None


@lru_cache(maxsize=200_000)
def molecule_set(smiles: str) -> frozenset[str] | None:
    """The molecules a SMILES holds, as a set of identities (InChIKey; canonical SMILES where RDKit
    cannot make one), or None when RDKit cannot parse it. 'A.B' and 'B.A' give the same set, as
    LlaSMol compares multi-molecule answers (reactant lists)."""
    mol = mol_from_smiles(smiles)
    if mol is None:
        return None
    return frozenset(
        Chem.MolToInchiKey(fragment) or "smiles:" + Chem.MolToSmiles(fragment)
        for fragment in Chem.GetMolFrags(mol, asMols=True)
    )


def same_molecule(smiles_a: str, smiles_b: str) -> bool:
    """The same set of molecules: equal InChIKeys (which also equate tautomers written differently),
    order of dot-separated molecules ignored."""
    molecules_a = molecule_set(smiles_a)
    return molecules_a is not None and molecules_a == molecule_set(smiles_b)


@dataclass(frozen=True)
class Similarity:
    """Tanimoto similarity of two molecules by three fingerprints, as LlaSMol reports them."""

    maccs: float  # the 166 MACCS structural keys
    rdkit: float  # RDKit's path fingerprint (paths of 1-7 bonds, 2048 bits)
    morgan: float  # Morgan radius 2, counts (RDKit's GetMorganFingerprint(mol, 2))


_RDKIT_FINGERPRINT = rdFingerprintGenerator.GetRDKitFPGenerator()
_MORGAN_FINGERPRINT = rdFingerprintGenerator.GetMorganGenerator(radius=2)


def similarity(smiles_a: str, smiles_b: str) -> Similarity | None:
    """Fingerprint similarity of two SMILES (a multi-molecule SMILES is fingerprinted whole, so
    molecule order does not matter); None when either does not parse."""
    mol_a, mol_b = mol_from_smiles(smiles_a), mol_from_smiles(smiles_b)
    if mol_a is None or mol_b is None:
        return None
    return Similarity(
        maccs=DataStructs.TanimotoSimilarity(MACCSkeys.GenMACCSKeys(mol_a), MACCSkeys.GenMACCSKeys(mol_b)),
        rdkit=DataStructs.TanimotoSimilarity(
            _RDKIT_FINGERPRINT.GetFingerprint(mol_a), _RDKIT_FINGERPRINT.GetFingerprint(mol_b)
        ),
        morgan=DataStructs.TanimotoSimilarity(
            _MORGAN_FINGERPRINT.GetSparseCountFingerprint(mol_a), _MORGAN_FINGERPRINT.GetSparseCountFingerprint(mol_b)
        ),
    )


def hill_formula(mol: Chem.Mol) -> str:
    return rdMolDescriptors.CalcMolFormula(mol)


_ELEMENT = re.compile(r"([A-Z][a-z]?)(\d*)")


def parse_formula(formula: str | None) -> Counter[str] | None:
    """Element counts of a formula such as 'C2H6O' or 'Ca(OH)2'; None if it does not parse.

    Order does not matter ('H6C2O' equals 'C2H6O'); a trailing charge ('+', '2-') is ignored.
    """
    if formula is None:
        return None
    text = re.sub(r"\s+", "", formula)
    text = re.sub(r"\d*[+-]$", "", text)
    if not text:
        return None
    counts, position = _parse_group(text, 0)
    if position != len(text) or not counts:
        return None
    return counts


def _parse_group(text: str, position: int) -> tuple[Counter[str], int]:
    counts: Counter[str] = Counter()
    while position < len(text):
        char = text[position]
        if char == "(":
            inner, position = _parse_group(text, position + 1)
            if position >= len(text) or text[position] != ")":
                return Counter(), -1
            position += 1
            multiplier, position = _read_int(text, position)
            for element, n in inner.items():
                counts[element] += n * multiplier
        elif char == ")":
            return counts, position
        else:
            match = _ELEMENT.match(text, position)
            if match is None:
                return Counter(), -1
            counts[match.group(1)] += int(match.group(2) or 1)
            position = match.end()
    return counts, position


def _read_int(text: str, position: int) -> tuple[int, int]:
    end = position
    while end < len(text) and text[end].isdigit():
        end += 1
    return (int(text[position:end]) if end > position else 1), end


def normalize_iupac(name: str | None) -> str | None:
    """Lower case, no whitespace, one kind of dash: how LlaSMol-style scoring compares names."""
    if name is None:
        return None
    text = re.sub(r"\s+", "", name).lower()
    text = re.sub("[\u2010-\u2015\u2212]", "-", text)
    return text or None


def iupac_parts(name: str) -> list[str]:
    """The `;`-separated parts of a name (PubChem names salts and mixtures 'sodium;chloride'),
    each normalised, sorted: LlaSMol's split match compares these."""
    return sorted(normalize_iupac(part) or "" for part in name.split(";"))


def crippen_logp(mol: Chem.Mol) -> float:
    return Crippen.MolLogP(mol)


def passes_rule_of_three(mol: Chem.Mol) -> bool:
    """Congreve's rule of three for fragment-likeness (Drug Discov. Today 2003): MW <= 300,
    LogP <= 3, H-bond donors <= 3, H-bond acceptors <= 3, rotatable bonds <= 3."""
    return (
        Descriptors.MolWt(mol) <= 300
        and Crippen.MolLogP(mol) <= 3
        and Lipinski.NumHDonors(mol) <= 3
        and Lipinski.NumHAcceptors(mol) <= 3
        and rdMolDescriptors.CalcNumRotatableBonds(mol) <= 3
    )
