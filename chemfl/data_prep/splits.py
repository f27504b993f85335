"""Train / validation / test splits with no molecule on both sides of a split boundary.

A record's identities are the molecules it is about: the InChIKey of each SMILES core and the
normalised text of each IUPAC core. Records that share any identity (the same molecule asked as
I2S, S2I, S2F, ...) form one group, and a group never straddles two splits.

Limit: a molecule named only by IUPAC name in one record and only drawn as SMILES in another,
with no record giving both, cannot be linked here (that needs a name-to-structure tool such as
OPSIN). The offline source therefore splits per molecule itself; SMolInstruct ships its own
leakage-free splits; local files without splits should include name conversions or a split.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

from chemfl.data_prep import chem
from chemfl.data_prep.schema import SPLITS
from chemfl.errors import ChemFLError


def record_identities(record: dict) -> set[str]:
    identities: set[str] = set()
    for core, tag in (
        (record["raw_input"], record["input_core_tag_left"]),
        (record["raw_output"], record["output_core_tag_left"]),
    ):
        if tag == "<SMILES>":
            # A whole multi-fragment SMILES is one identity: splitting it would let common
            # reagents (water, HCl) chain every reaction into one group.
            identities.add("mol:" + (chem.inchi_key(core) or core.strip()))
        elif tag == "<IUPAC>":
            identities.add("name:" + (chem.normalize_iupac(core) or ""))
    if not identities:  # text-only records are their own group
        identities.add(f"text:{record['task']}:{record['raw_input']}")
    return identities


def molecule_groups(records: Sequence[dict]) -> list[list[int]]:
    """Indices of `records` grouped by shared identities (union-find), in a deterministic order."""
    parent: dict[str, str] = {}

    def find(key: str) -> str:
        root = key
        while parent[root] != root:
            root = parent[root]
        while parent[key] != root:  # path compression
            parent[key], key = root, parent[key]
        return root

    record_keys = []
    for record in records:
        keys = sorted(record_identities(record))
        record_keys.append(keys)
        for key in keys:
            parent.setdefault(key, key)
        first = find(keys[0])
        for key in keys[1:]:
            other = find(key)
            if other != first:
                parent[max(first, other)] = min(first, other)
                first = min(first, other)
    groups: dict[str, list[int]] = {}
    for index, keys in enumerate(record_keys):
        groups.setdefault(find(keys[0]), []).append(index)
    return [groups[root] for root in sorted(groups)]


def assign_splits(
    records: list[dict],
    test_fraction: float,
    validation_fraction: float,
    seed: int,
    groups: list[list[int]] | None = None,
) -> None:
    """Give every record a split, group by group, in a seeded order (records are edited in place).

    `groups` defaults to molecule_groups(records); a source that knows its molecules (offline)
    passes them, which also ties together records that name a molecule in different ways.
    """
    groups = list(molecule_groups(records) if groups is None else groups)
    random.Random(seed).shuffle(groups)
    total = len(records)
    targets = (("test", test_fraction * total), ("validation", validation_fraction * total))
    position = 0
    for split, target in targets:
        taken = 0
        while position < len(groups) and taken < target:
            for index in groups[position]:
                records[index]["split"] = split
            taken += len(groups[position])
            position += 1
    for group in groups[position:]:
        for index in group:
            records[index]["split"] = "train"


def remove_leakage(records: list[dict]) -> tuple[list[dict], Counter[str]]:
    """Keep given splits but drop records whose molecule also sits in a more held-out split.

    Test wins over validation, validation over train: the shared test set stays intact.
    Returns the kept records and how many were dropped from each split.
    """
    seen: dict[str, set[str]] = {"test": set(), "validation": set()}
    identities = [record_identities(record) for record in records]
    for record, keys in zip(records, identities, strict=False):
        if record["split"] in seen:
            seen[record["split"]] |= keys
    dropped: Counter[str] = Counter()
    kept = []
    for record, keys in zip(records, identities, strict=False):
        held_out = {"train": ("test", "validation"), "validation": ("test",), "test": ()}[record["split"]]
        if any(keys & seen[split] for split in held_out):
            dropped[record["split"]] += 1
        else:
            kept.append(record)
    return kept, dropped


def split_records(
    records: list[dict], test_fraction: float, validation_fraction: float, seed: int
) -> tuple[list[dict], Counter[str]]:
    """Records with a split each and none leaking; sources that carry splits keep them."""
    with_split = sum(record["split"] is not None for record in records)
    if with_split == 0:
        assign_splits(records, test_fraction, validation_fraction, seed)
    elif with_split != len(records):
        raise ChemFLError(
            f"{with_split} of {len(records)} records carry a split and the rest do not; "
            "give every record a split or none (ChemFL then splits by molecule)"
        )
    kept, dropped = remove_leakage(records)
    missing = [split for split in SPLITS if not any(r["split"] == split for r in kept)]
    if missing:
        raise ChemFLError(
            f"the {', '.join(missing)} split(s) came out empty; raise data.test-fraction / "
            "data.validation-fraction or build from more data"
        )
    return kept, dropped
