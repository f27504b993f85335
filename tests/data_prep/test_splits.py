"""Molecule-level splits: no molecule on both sides of a split boundary."""

from __future__ import annotations

from collections import Counter

import pytest

from chemfl.data_prep import chem, store
from chemfl.data_prep.schema import FIELDS
from chemfl.data_prep.sources.offline import load_offline
from chemfl.data_prep.splits import (
    assign_splits,
    molecule_groups,
    record_identities,
    remove_leakage,
    split_records,
)
from chemfl.errors import ChemFLError

TAG = {
    "smiles": ("<SMILES>", "</SMILES>"),
    "iupac": ("<IUPAC>", "</IUPAC>"),
    "formula": ("<MOLFORMULA>", "</MOLFORMULA>"),
    "number": ("<NUMBER>", "</NUMBER>"),
}


def make(task: str, raw_input: str, in_kind: str, raw_output: str, out_kind: str, split: str | None = None) -> dict:
    (in_left, in_right), (out_left, out_right) = TAG[in_kind], TAG[out_kind]
    return {
        "input": f"Q {in_left} {raw_input} {in_right}",
        "output": f"{out_left} {raw_output} {out_right}",
        "raw_input": raw_input,
        "raw_output": raw_output,
        "split": split,
        "task": task,
        "input_core_tag_left": in_left,
        "input_core_tag_right": in_right,
        "output_core_tag_left": out_left,
        "output_core_tag_right": out_right,
        "target": None,
    }


def ethanol_records() -> list[dict]:
    """Ethanol asked five ways: SMILES written three ways, its name in two letter cases."""
    return [
        make("s2f", "OCC", "smiles", "C2H6O", "formula"),
        make("s2i", "C(C)O", "smiles", "ethanol", "iupac"),
        make("i2s", "Ethanol", "iupac", "CCO", "smiles"),
        make("i2f", "ETHANOL ", "iupac", "C2H6O", "formula"),
        make("logp", "[CH3][CH2][OH]", "smiles", "-0.00", "number"),
    ]


def filler_records(n: int) -> list[dict]:
    """n distinct molecules (straight chains C1..Cn), one s2f record each."""
    return [make("s2f", "C" * k, "smiles", f"C{k}H{2 * k + 2}", "formula") for k in range(1, n + 1)]


def assert_no_identity_crosses_splits(records: list[dict]) -> None:
    by_split: dict[str, set[str]] = {"train": set(), "validation": set(), "test": set()}
    for record in records:
        by_split[record["split"]] |= record_identities(record)
    assert not by_split["test"] & by_split["train"]
    assert not by_split["test"] & by_split["validation"]
    assert not by_split["validation"] & by_split["train"]


# --- identities and groups ---------------------------------------------------------------------


def test_the_same_molecule_written_differently_has_one_identity():
    keys = [record_identities(r) for r in ethanol_records()]
    mol = "mol:" + chem.inchi_key("CCO")
    name = "name:ethanol"
    assert keys == [{mol}, {mol, name}, {name, mol}, {name}, {mol}]


def test_records_about_one_molecule_form_one_group():
    records = filler_records(6) + ethanol_records()
    groups = molecule_groups(records)
    assert sorted(i for group in groups for i in group) == list(range(len(records)))
    ethanol = set(range(6, 11))
    assert ethanol in [set(group) for group in groups]
    assert len(groups) == 6 + 1  # six chains (ethane is not ethanol) and one ethanol group
    assert molecule_groups(records) == groups  # deterministic


def test_a_name_only_record_joins_its_molecule_through_a_bridging_record():
    # i2f knows only the name and s2f only the structure; s2i ties them together.
    i2f, s2f = make("i2f", "ethanol", "iupac", "C2H6O", "formula"), make("s2f", "OCC", "smiles", "C2H6O", "formula")
    assert len(molecule_groups([i2f, s2f])) == 2
    bridge = make("s2i", "CCO", "smiles", "Ethanol", "iupac")
    assert molecule_groups([i2f, s2f, bridge]) == [[0, 1, 2]]


def test_invalid_smiles_and_text_only_records_still_get_identities():
    bad = make("s2f", " C1CC ", "smiles", "C3H6", "formula")
    assert record_identities(bad) == {"mol:C1CC"}
    text = {**bad, "input_core_tag_left": None, "output_core_tag_left": None, "raw_input": "describe it"}
    assert record_identities(text) == {"text:s2f:describe it"}


# --- assigned splits ---------------------------------------------------------------------------


def test_handcrafted_molecule_never_straddles_splits_for_any_seed():
    for seed in range(12):
        records = filler_records(40) + ethanol_records()
        kept, dropped, carved = split_records(records, 0.2, 0.2, seed)
        assert len(kept) == len(records) and not dropped and carved is None
        assert len({r["split"] for r in kept[-5:]}) == 1, seed  # all five ethanol records together
        assert_no_identity_crosses_splits(kept)
        assert {r["split"] for r in kept} == {"train", "validation", "test"}


def test_split_sizes_follow_the_fractions():
    records = filler_records(100)
    assign_splits(records, 0.1, 0.2, seed=3)
    counts = Counter(r["split"] for r in records)
    assert counts == {"test": 10, "validation": 20, "train": 70}


def test_split_assignment_is_deterministic_for_a_seed_and_differs_for_another():
    def splits(seed: int) -> list[str]:
        records = filler_records(60) + ethanol_records()
        assign_splits(records, 0.1, 0.1, seed)
        return [r["split"] for r in records]

    assert splits(5) == splits(5)
    assert splits(5) != splits(6)


def test_no_leakage_on_a_small_offline_build(small_build):
    test = store.read_records(small_build / "test.parquet")
    validation = store.read_records(small_build / "validation.parquet")
    train = [r for shard in sorted(small_build.glob("partitions/*/train.parquet")) for r in store.read_records(shard)]
    shard_validation = [
        r for shard in sorted(small_build.glob("partitions/*/validation.parquet")) for r in store.read_records(shard)
    ]
    assert test and validation and train
    assert sorted(map(repr, shard_validation)) == sorted(map(repr, validation))

    def identities(records):
        return set().union(*(record_identities(r) for r in records))

    assert not identities(test) & identities(train)
    assert not identities(test) & identities(validation)
    assert not identities(validation) & identities(train)
    assert {r["split"] for r in test} == {"test"} and {r["split"] for r in train} == {"train"}


def test_a_molecule_asked_only_by_name_in_one_task_and_by_structure_in_another_stays_in_one_split():
    """Offline records of a task subset without i2s/s2i: the same molecule appears as a name (i2f)
    and as a SMILES (logp). splits.py promises no molecule on both sides of a split boundary."""
    named, _ = load_offline(["name_conversion-i2s"], 60, 42, 0.1, 0.05)
    key_of_name = {r["raw_input"]: chem.inchi_key(r["raw_output"]) for r in named}
    records, _ = load_offline(["name_conversion-i2f", "property_prediction-logp"], 60, 42, 0.1, 0.05)
    kept, _, _ = split_records(records, 0.1, 0.05, 42, assigned_by_source=True)

    def molecule(record):
        if record["task"] == "name_conversion-i2f":
            return key_of_name[record["raw_input"]]
        return chem.inchi_key(record["raw_input"])

    test = {molecule(r) for r in kept if r["split"] == "test"}
    train = {molecule(r) for r in kept if r["split"] == "train"}
    assert test
    assert not test & train, f"{len(test & train)} of {len(test)} test molecules are also in train"


# --- given splits ------------------------------------------------------------------------------


def test_remove_leakage_keeps_test_and_drops_train_and_validation_copies():
    records = [
        make("s2f", "CCO", "smiles", "C2H6O", "formula", "train"),
        make("i2f", "ethanol", "iupac", "C2H6O", "formula", "train"),  # joins via the s2i test record
        make("s2i", "OCC", "smiles", "ethanol", "iupac", "test"),
        make("s2f", "C(C)O", "smiles", "C2H6O", "formula", "validation"),
        make("s2f", "CCC", "smiles", "C3H8", "formula", "validation"),
        make("s2f", "C(C)C", "smiles", "C3H8", "formula", "train"),  # propane sits in validation
        make("s2f", "CCCC", "smiles", "C4H10", "formula", "train"),
        make("s2f", "CCCCC", "smiles", "C5H12", "formula", "test"),
    ]
    kept, dropped = remove_leakage(records)
    assert [r["raw_input"] for r in kept] == ["OCC", "CCC", "CCCC", "CCCCC"]
    assert dropped == {"train": 3, "validation": 1}
    assert_no_identity_crosses_splits(kept)


def test_split_records_keeps_given_splits():
    records = [
        make("s2f", "C" * k, "smiles", "x", "formula", split)
        for k, split in zip(range(1, 7), ["train", "train", "validation", "test", "train", "test"], strict=False)
    ]
    kept, dropped, carved = split_records([dict(r) for r in records], 0.5, 0.4, seed=0)
    assert [r["split"] for r in kept] == [r["split"] for r in records]
    assert not dropped and carved is None


def test_mixed_split_and_no_split_records_are_refused():
    records = filler_records(10)
    records[3]["split"] = "test"
    with pytest.raises(ChemFLError, match="1 of 10 records carry a split"):
        split_records(records, 0.1, 0.1, 0)


# --- given train and test, no validation: carved out of train ------------------------------------


def train_and_test_records() -> list[dict]:
    """40 chains in train, ethanol asked five ways in train, and test: chains 41-50 plus propanol,
    which a train record also names (a leak that must be dropped before carving)."""
    train = [{**r, "split": "train"} for r in filler_records(40) + ethanol_records()]
    test = [make("s2f", "C" * k, "smiles", f"C{k}H{2 * k + 2}", "formula", "test") for k in range(41, 51)]
    propanol = [
        make("s2i", "CCCO", "smiles", "propan-1-ol", "iupac", "test"),
        make("i2f", "Propan-1-ol", "iupac", "C3H8O", "formula", "train"),  # leaks: dropped
    ]
    return train + test + propanol


def test_validation_is_carved_from_train_by_whole_molecule_groups():
    for seed in range(12):
        records = train_and_test_records()
        kept, dropped, carved = split_records(records, 0.1, 0.2, seed)
        assert dropped == {"train": 1}  # the propanol copy in train
        assert_no_identity_crosses_splits(kept)
        counts = Counter(r["split"] for r in kept)
        assert counts["test"] == 11  # test is never touched
        assert counts["validation"] == carved["records"] > 0
        assert counts["train"] == carved["train_records_after"]
        assert carved["train_records_before"] == 45 == counts["train"] + counts["validation"]
        assert carved["records"] >= 0.2 * 45 and carved["fraction"] == 0.2 and carved["seed"] == seed
        ethanol_splits = {r["split"] for r in kept[40:45]}
        assert len(ethanol_splits) == 1, seed  # the five ethanol records move together
        assert carved["molecule_groups"] == len(molecule_groups([r for r in kept if r["split"] == "validation"]))


def test_carving_is_seeded_by_data_seed():
    def validation(seed: int) -> list[str]:
        kept, _, _ = split_records(train_and_test_records(), 0.1, 0.2, seed)
        return [r["raw_input"] for r in kept if r["split"] == "validation"]

    assert validation(3) == validation(3)
    assert validation(3) != validation(4)


def test_carving_leaves_train_at_least_one_group():
    records = [make("s2f", "C" * k, "smiles", "x", "formula", "train" if k < 3 else "test") for k in range(1, 6)]
    kept, _, carved = split_records(records, 0.1, 0.9, 0)
    assert Counter(r["split"] for r in kept) == {"test": 3, "train": 1, "validation": 1}
    assert carved["records"] == 1 and carved["train_records_after"] == 1


def test_too_few_train_molecules_to_carve_is_an_error():
    records = [*ethanol_records(), *filler_records(3)]
    for record in records[:5]:
        record["split"] = "train"  # one molecule group in train
    for record in records[5:]:
        record["split"] = "test"
    with pytest.raises(ChemFLError, match=r"no validation records, and the 5 train record\(s\) form 1 molecule group"):
        split_records(records, 0.1, 0.1, 0)


@pytest.mark.parametrize("splits, absent", [(("train", "validation"), "test"), (("test", "validation"), "train")])
def test_given_splits_without_train_or_test_are_an_error(splits, absent):
    records = [make("s2f", "C" * k, "smiles", "x", "formula", splits[k % 2]) for k in range(1, 7)]
    with pytest.raises(ChemFLError, match=f"the data carry splits but no {absent} records"):
        split_records(records, 0.1, 0.1, 0)


def test_a_given_split_emptied_by_leakage_names_the_drops():
    records = [
        make("s2f", "CCO", "smiles", "C2H6O", "formula", "train"),
        make("s2f", "OCC", "smiles", "C2H6O", "formula", "validation"),
        make("s2f", "C(C)O", "smiles", "C2H6O", "formula", "test"),
    ]
    with pytest.raises(ChemFLError, match=r"train, validation split\(s\) came out empty.*'train': 1, 'validation': 1"):
        split_records(records, 0.1, 0.1, 0)


def test_fractions_too_small_for_assigned_splits_name_the_fractions():
    with pytest.raises(ChemFLError, match="came out empty; raise data.test-fraction"):
        split_records(filler_records(2), 0.1, 0.1, 0)


def test_records_keep_their_fields():
    records = filler_records(20)
    kept, _, _ = split_records(records, 0.1, 0.1, 0)
    assert all(set(r) == set(FIELDS) for r in kept)
