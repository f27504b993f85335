"""Train / validation / test splits with no molecule on both sides of a split boundary.

A record's identities are the molecules it is about: the InChIKey of each SMILES core and the
normalised text of each IUPAC core. Records that share any identity (the same molecule asked as
I2S, S2I, S2F, ...) form one group, and a group never straddles two splits.

Limit: a molecule named only by IUPAC name in one record and only drawn as SMILES in another,
with no record giving both, cannot be linked here (that needs a name-to-structure tool such as
OPSIN). The offline source therefore splits per molecule itself; SMolInstruct ships its own
leakage-free splits; local files without splits should include name conversions or a split.

Sources that carry splits keep them (leaking train / validation copies of test molecules are
dropped). When they carry train and test but no validation records, validation is carved out of
train, whole molecule groups only (`carve_validation`).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

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


def carve_validation(records: list[dict], fraction: float, seed: int) -> dict:
    """Move whole molecule groups of the train records to validation, about `fraction` of them, in a
    seeded order (records are edited in place). Test is untouched; train keeps at least one group.
    Returns what was carved, for the manifest."""
    train = [record for record in records if record["split"] == "train"]
    groups = molecule_groups(train)
    if len(groups) < 2:
        raise ChemFLError(
            f"the data carry train and test records but no validation records, and the {len(train)} "
            f"train record(s) form {len(groups)} molecule group(s): too few to carve a validation split "
            "from; add validation records (split = validation) or more training data"
        )
    random.Random(seed).shuffle(groups)
    target, taken, carved_groups = fraction * len(train), 0, 0
    for group in groups[:-1]:  # the last group always stays in train
        if taken >= target:
            break
        for index in group:
            train[index]["split"] = "validation"
        taken += len(group)
        carved_groups += 1
    return {
        "fraction": fraction,
        "seed": seed,
        "records": taken,
        "molecule_groups": carved_groups,
        "train_records_before": len(train),
        "train_records_after": len(train) - taken,
    }


class SplitResult(NamedTuple):
    records: list[dict]  # every kept record, each with its split
    dropped: Counter[str]  # records dropped per split because their molecule sits in a more held-out split
    carved: dict | None  # the source gave train and test but no validation: what carve_validation did


def split_records(
    records: list[dict],
    test_fraction: float,
    validation_fraction: float,
    seed: int,
    assigned_by_source: bool = False,
) -> SplitResult:
    """Records with a split each and none leaking; sources that carry splits keep them, and when they
    carry no validation records, validation is carved out of train by molecule group.

    `assigned_by_source`: the source split the records itself with the fractions (offline), so
    they count as records without a given split.
    """
    with_split = sum(record["split"] is not None for record in records)
    if with_split == 0:
        assign_splits(records, test_fraction, validation_fraction, seed)
    elif with_split != len(records):
        raise ChemFLError(
            f"{with_split} of {len(records)} records carry a split and the rest do not; "
            "give every record a split or none (ChemFL then splits by molecule)"
        )
    given_splits = with_split > 0 and not assigned_by_source
    given = Counter(record["split"] for record in records)
    if given_splits:
        absent = [split for split in ("train", "test") if not given[split]]
        if absent:
            raise ChemFLError(
                f"the data carry splits but no {' or '.join(absent)} records; give every split "
                "(validation may be left out: it is then carved from train), or give no split at all "
                "(ChemFL then splits by molecule)"
            )
    kept, dropped = remove_leakage(records)
    carved = None
    if given_splits and not given["validation"] and any(r["split"] == "train" for r in kept):
        # After remove_leakage no train record shares a molecule with test; carving whole groups of
        # what is left keeps validation apart from both.
        carved = carve_validation(kept, validation_fraction, seed)
    missing = [split for split in SPLITS if not any(r["split"] == split for r in kept)]
    if missing and given_splits:
        raise ChemFLError(
            f"the {', '.join(missing)} split(s) came out empty: every such record shares a molecule "
            f"with a more held-out split and was dropped ({dict(sorted(dropped.items()))}); give the "
            "data splits by molecule, or give no split at all (ChemFL then splits by molecule)"
        )
    if missing:
        raise ChemFLError(
            f"the {', '.join(missing)} split(s) came out empty; raise data.test-fraction / "
            "data.validation-fraction or build from more data"
        )
    return SplitResult(kept, dropped, carved)
