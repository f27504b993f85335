"""Reactions among the offline molecules, computed exactly with RDKit reaction templates.

Four textbook reaction classes, each a two-reactant template. A molecule takes part as a reactant
only when it carries exactly one site of one functional group and no other reactive group, so
every template gives exactly one product (no question of which site reacts), and at most once, so
a reaction and its two reactant molecules can share one split without chaining molecules together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from rdkit import Chem
from rdkit.Chem import rdChemReactions

from chemfl.data_prep import chem

# As large as the largest offline molecule: a product fits the same token budget as the other tasks.
MAX_PRODUCT_HEAVY_ATOMS = 30

# A primary or secondary amine whose nitrogen bears only carbons, none of them double- or triple-bonded
# to a heteroatom (no amides, ureas, amidines, sulfonamides, hydrazines, nitriles); anilines count.
_AMINE = "[NX3;H2,H1;+0;!$(N[!#6]);!$(N[#6]=[!#6]);!$(N[#6]#*)"
# A carboxylic acid on carbon (no formic, carbamic or carbonic acids).
_ACID = "[CX3;$(C[#6])"
# An alcohol on an sp3 carbon that bears no other heteroatom (no hemiacetals or gem-diols).
_ALCOHOL = "[OX2H1;$(O[CX4;!$(C(O)[!#6])])"
# An aldehyde or ketone: the carbonyl carbon bears only carbons (and hydrogen).
_CARBONYL = "[CX3;$([CH1][#6]),$(C([#6])[#6])"
_PHENOL = "[OX2H1;$(Oc)"
# A methyl or primary alkyl chloride, bromide or iodide (SN2 electrophiles).
_ALKYL_HALIDE = "[CX4;$([CH3][Cl,Br,I]),$([CH2]([Cl,Br,I])[#6])"

# One match per reactive site; the first atom is the one that reacts.
FUNCTIONAL_GROUPS: dict[str, str] = {
    "carboxylic acid": f"{_ACID}](=[OX1])[OX2H1]",
    "amine": f"{_AMINE}]",
    "alcohol": f"{_ALCOHOL}]",
    "aldehyde or ketone": f"{_CARBONYL}]=[OX1]",
    "phenol": f"{_PHENOL}]",
    "alkyl halide": f"{_ALKYL_HALIDE}][Cl,Br,I]",
}
# Groups no template uses that would compete with a template's site (acylation, thiolate attack).
_INTERFERING_GROUPS = (
    "[CX3](=O)[F,Cl,Br,I]",  # acyl halide
    "[SX4](=O)(=O)[F,Cl,Br,I]",  # sulfonyl halide
    "[CX3](=O)[OX2][CX3]=O",  # anhydride
    "[SX2H1]",  # thiol
    "N=C=[O,S]",  # isocyanate, isothiocyanate
)


@dataclass(frozen=True)
class ReactionClass:
    name: str
    roles: tuple[str, str]  # the functional group of each reactant, in the template's order
    smarts: str  # atom-mapped reaction SMARTS: reactant templates >> the product template

    @cached_property
    def template(self) -> rdChemReactions.ChemicalReaction:
        reaction = rdChemReactions.ReactionFromSmarts(self.smarts)
        reaction.Initialize()
        return reaction

    @cached_property
    def atoms_lost(self) -> int:
        """Heavy atoms the reactants lose (the unmapped atoms of the reactant templates)."""
        return sum(not atom.GetAtomMapNum() for part in self.template.GetReactants() for atom in part.GetAtoms())


REACTION_CLASSES: tuple[ReactionClass, ...] = (
    ReactionClass(
        "amide coupling",
        ("carboxylic acid", "amine"),
        f"{_ACID}:1](=[OX1:2])[OX2H1].{_AMINE}:3]>>[C:1](=[O:2])[N:3]",
    ),
    ReactionClass(
        "Fischer esterification",
        ("carboxylic acid", "alcohol"),
        # The acid loses its OH; the alcohol's oxygen stays (acyl-oxygen cleavage).
        f"{_ACID}:1](=[OX1:2])[OX2H1].{_ALCOHOL}:3]>>[C:1](=[O:2])[O:3]",
    ),
    ReactionClass(
        "reductive amination",
        ("aldehyde or ketone", "amine"),
        f"{_CARBONYL}:1]=[OX1].{_AMINE}:2]>>[C:1][N:2]",
    ),
    ReactionClass(
        "Williamson ether synthesis",
        ("phenol", "alkyl halide"),
        f"{_PHENOL}:1].{_ALKYL_HALIDE}:2][Cl,Br,I]>>[O:1][C:2]",
    ),
)
REACTION_CLASSES_BY_NAME: dict[str, ReactionClass] = {reaction.name: reaction for reaction in REACTION_CLASSES}

_GROUP_PATTERNS = {name: Chem.MolFromSmarts(smarts) for name, smarts in FUNCTIONAL_GROUPS.items()}
_INTERFERING_PATTERNS = tuple(Chem.MolFromSmarts(smarts) for smarts in _INTERFERING_GROUPS)


@dataclass(frozen=True)
class Reaction:
    reaction_class: str
    reactants: tuple[str, ...]  # RDKit canonical SMILES, in the template's order
    product: str  # RDKit canonical SMILES

    @property
    def reactants_smiles(self) -> str:
        """The reactants as one dot-joined SMILES, fragments in RDKit's canonical order."""
        return chem.canonical_smiles(".".join(self.reactants))


def reactive_group(smiles: str) -> str | None:
    """The functional group `smiles` reacts through, or None unless it has exactly one reactive site."""
    mol = chem.mol_from_smiles(smiles)
    if mol is None or any(mol.HasSubstructMatch(pattern) for pattern in _INTERFERING_PATTERNS):
        return None
    sites = {name: len(mol.GetSubstructMatches(pattern)) for name, pattern in _GROUP_PATTERNS.items()}
    present = [name for name, count in sites.items() if count]
    if len(present) != 1 or sites[present[0]] != 1:
        return None
    return present[0]


def run_template(reaction_class: ReactionClass, reactants: Sequence[str]) -> str | None:
    """The canonical SMILES of the one product the template gives for `reactants` (in role order),
    or None when it gives none, several, or one that RDKit cannot sanitise."""
    mols = [chem.mol_from_smiles(smiles) for smiles in reactants]
    if any(mol is None for mol in mols):
        return None
    products: set[str] = set()
    for (product,) in reaction_class.template.RunReactants(mols):
        try:
            Chem.SanitizeMol(product)
        except Chem.MolSanitizeException:
            return None
        # Through SMILES and back: a template's product can carry flags a parsed molecule would not.
        canonical = chem.canonical_smiles(Chem.MolToSmiles(product))
        if canonical is None:
            return None
        products.add(canonical)
    return products.pop() if len(products) == 1 else None


def find_reactions(molecules: Sequence[str]) -> list[Reaction]:
    """Reactions among `molecules` (canonical SMILES, in the build's seeded order), the classes
    taking turns so each gets its share of the shared reactants (acids, amines).

    Each molecule is a reactant at most once; a product has at most MAX_PRODUCT_HEAVY_ATOMS heavy
    atoms. Reactants are paired in the order given, so the same molecules give the same reactions.
    """
    heavy_atoms: dict[str, int] = {}
    by_group: dict[str, list[str]] = {name: [] for name in FUNCTIONAL_GROUPS}
    for smiles in molecules:
        group = reactive_group(smiles)
        if group is not None:
            by_group[group].append(smiles)
            heavy_atoms[smiles] = chem.mol_from_smiles(smiles).GetNumHeavyAtoms()
    # Each class walks its own copy of the candidates: a molecule too large for one partner class
    # may still fit another.
    candidates = {cls.name: tuple(list(by_group[role]) for role in cls.roles) for cls in REACTION_CLASSES}
    used: set[str] = set()
    reactions: list[Reaction] = []
    active = list(REACTION_CLASSES)
    while active:
        for reaction_class in tuple(active):
            reaction = _next_reaction(reaction_class, candidates[reaction_class.name], heavy_atoms, used)
            if reaction is None:
                active.remove(reaction_class)
                continue
            reactions.append(reaction)
            used.update(reaction.reactants)
    return reactions


def _next_reaction(
    reaction_class: ReactionClass, candidates: tuple[list[str], list[str]], heavy_atoms: dict[str, int], used: set[str]
) -> Reaction | None:
    firsts, seconds = candidates
    while firsts:
        first = firsts[0]
        if first not in used:
            for second in seconds:
                if second in used:
                    continue
                if heavy_atoms[first] + heavy_atoms[second] - reaction_class.atoms_lost > MAX_PRODUCT_HEAVY_ATOMS:
                    continue
                product = run_template(reaction_class, (first, second))
                if product is not None:
                    return Reaction(reaction_class.name, (first, second), product)
        # No partner now means none later: the unused partners only become fewer.
        firsts.pop(0)
    return None
