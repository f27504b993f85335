"""Facility partitions: iid, dirichlet over tasks, by-task, relative sizes."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chemfl.data_prep.partitions import PartitionSpec, parse_task_map, partition_indices, shares_to_counts
from chemfl.errors import ChemFLError

FACILITIES = ("polaris", "aurora", "frontier", "perlmutter")
TASKS = [f"task{i}" for i in range(6)]
ROWS = [TASKS[i % 6] for i in range(600)]  # 100 rows of each task
BY_TASK = {
    "task0": "polaris",
    "task1": "polaris",
    "task2": "aurora",
    "task3": "frontier",
    "task4": "perlmutter",
    "task5": "aurora",
}


def spec(scheme: str, **options) -> PartitionSpec:
    options.setdefault("facilities", FACILITIES)
    options.setdefault("seed", 0)
    return PartitionSpec(scheme=scheme, **options)


SCHEMES = {
    "iid": spec("iid"),
    "dirichlet": spec("dirichlet", alpha=0.5),
    "by-task": spec("by-task", task_map=BY_TASK),
    "sizes": spec("sizes", sizes=(4.0, 2.0, 1.0, 1.0)),
}


def partition(rows, partition_spec):
    partition_spec.validate(sorted(set(rows)))
    return partition_indices(rows, partition_spec)


def assert_exact_cover(parts, n_rows):
    every = [i for part in parts for i in part]
    assert sorted(every) == list(range(n_rows))  # each row in exactly one partition
    assert all(parts)


def task_shares(rows, part):
    counts = Counter(rows[i] for i in part)
    return {task: counts[task] / len(part) for task in TASKS}


def mean_distance_from_global_mix(rows, parts) -> float:
    """Mean total-variation distance between each facility's task mix and the uniform global mix."""
    return sum(
        0.5 * sum(abs(share - 1 / len(TASKS)) for share in task_shares(rows, part).values()) for part in parts
    ) / len(parts)


# --- every scheme ------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_every_row_lands_in_exactly_one_partition(scheme):
    parts = partition(ROWS, SCHEMES[scheme])
    assert len(parts) == len(FACILITIES)
    assert_exact_cover(parts, len(ROWS))


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_partitions_are_deterministic_for_a_seed(scheme):
    assert partition(ROWS, SCHEMES[scheme]) == partition(ROWS, SCHEMES[scheme])


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "sizes"])
def test_another_seed_gives_other_partitions(scheme):
    other = PartitionSpec(**{**SCHEMES[scheme].__dict__, "seed": 1})
    assert partition(ROWS, SCHEMES[scheme]) != partition(ROWS, other)


def test_iid_partitions_are_equal_sized_and_mixed():
    parts = partition(ROWS, SCHEMES["iid"])
    assert [len(p) for p in parts] == [150] * 4
    assert mean_distance_from_global_mix(ROWS, parts) < 0.1


def test_sizes_follow_the_shares():
    parts = partition(ROWS, SCHEMES["sizes"])
    assert [len(p) for p in parts] == [300, 150, 75, 75]
    assert_exact_cover(parts, len(ROWS))


def test_sizes_with_an_uneven_total_add_up():
    rows = ROWS[:101]
    parts = partition(rows, spec("sizes", sizes=(3.0, 1.0, 1.0, 1.0)))
    sizes = [len(p) for p in parts]
    assert sum(sizes) == 101
    assert all(abs(size - share / 6 * 101) < 1 for size, share in zip(sizes, (3, 1, 1, 1), strict=False))


def test_dirichlet_with_small_alpha_skews_task_mixes_compared_with_iid():
    iid = mean_distance_from_global_mix(ROWS, partition(ROWS, SCHEMES["iid"]))
    skewed = mean_distance_from_global_mix(ROWS, partition(ROWS, spec("dirichlet", alpha=0.1)))
    near_iid = mean_distance_from_global_mix(ROWS, partition(ROWS, spec("dirichlet", alpha=1000.0)))
    assert skewed > 0.3 > 0.1 > iid
    assert near_iid < 0.1
    # With alpha 0.1 some facility misses some task entirely; iid gives everyone every task.
    assert any(min(task_shares(ROWS, p).values()) == 0 for p in partition(ROWS, spec("dirichlet", alpha=0.1)))
    assert all(min(task_shares(ROWS, p).values()) > 0 for p in partition(ROWS, SCHEMES["iid"]))


def test_by_task_puts_each_task_only_at_its_mapped_facility():
    parts = partition(ROWS, SCHEMES["by-task"])
    assert_exact_cover(parts, len(ROWS))
    for facility, part in zip(FACILITIES, parts, strict=False):
        assert {ROWS[i] for i in part} == {task for task, name in BY_TASK.items() if name == facility}


def test_by_task_follows_the_facility_order_not_the_alphabet():
    facilities = ("zeta", "alpha")
    parts = partition(
        ROWS[:60],
        spec(
            "by-task",
            facilities=facilities,
            task_map={
                "task0": "zeta",
                "task1": "alpha",
                "task2": "alpha",
                "task3": "alpha",
                "task4": "alpha",
                "task5": "alpha",
            },
        ),
    )
    assert {ROWS[i] for i in parts[0]} == {"task0"}
    assert len(parts[0]) == 10 and len(parts[1]) == 50


# --- shares_to_counts --------------------------------------------------------------------------


def test_shares_to_counts_by_hand():
    assert shares_to_counts([4, 2, 1, 1], 10) == [5, 3, 1, 1]
    assert shares_to_counts([1, 1, 1], 10) == [4, 3, 3]
    assert shares_to_counts([1, 1, 1], 0) == [0, 0, 0]
    assert shares_to_counts([0.1] * 10, 10) == [1] * 10
    assert shares_to_counts([2.5, 7.5], 8) == [2, 6]


@settings(max_examples=200, deadline=None)
@given(
    shares=st.lists(st.floats(min_value=0.01, max_value=100.0), min_size=1, max_size=12),
    total=st.integers(min_value=0, max_value=100_000),
)
def test_shares_to_counts_sums_exactly_and_stays_within_one_of_proportional(shares, total):
    counts = shares_to_counts(shares, total)
    assert sum(counts) == total
    assert all(count >= 0 for count in counts)
    for share, count in zip(shares, counts, strict=False):
        assert abs(count - share / sum(shares) * total) < 1 + 1e-9


# --- errors ------------------------------------------------------------------------------------


def test_unknown_scheme():
    with pytest.raises(ChemFLError, match="unknown partition scheme 'round-robin'"):
        spec("round-robin").validate(TASKS)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")])
def test_dirichlet_alpha_must_be_positive(alpha):
    with pytest.raises(ChemFLError, match="dirichlet-alpha"):
        spec("dirichlet", alpha=alpha).validate(TASKS)


def test_alpha_is_not_checked_for_other_schemes():
    spec("iid", alpha=0.0).validate(TASKS)  # no error: alpha is a dirichlet knob


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_more_partitions_than_examples(scheme):
    with pytest.raises(ChemFLError, match="3 training examples cannot fill 4 partitions"):
        partition_indices(ROWS[:3], SCHEMES[scheme])


def test_sizes_that_leave_a_facility_empty():
    with pytest.raises(ChemFLError, match="leaves a facility with none"):
        partition(ROWS[:10], spec("sizes", sizes=(100.0, 1.0, 1.0, 1.0)))


def test_dirichlet_that_cannot_fill_every_facility():
    rows = ["task0"] * 5 + ["task1"] * 5
    with pytest.raises(ChemFLError, match="could not give every facility data"):
        partition_indices(rows, spec("dirichlet", alpha=0.01))


def test_by_task_leaving_a_facility_without_a_task():
    task_map = {task: "polaris" for task in TASKS}
    with pytest.raises(ChemFLError, match=r"leaves facility\(ies\) \['aurora', 'frontier', 'perlmutter'\]"):
        spec("by-task", task_map=task_map).validate(TASKS)


@pytest.mark.parametrize(
    "names", [("Polaris",), ("1polaris",), ("polaris aurora",), ("pol/aris",), ("",), ("../up",), ("polaris.",)]
)
def test_bad_facility_names(names):
    with pytest.raises(ChemFLError, match="facility name"):
        spec("iid", facilities=names).validate(TASKS)


def test_no_facilities():
    with pytest.raises(ChemFLError, match="data.facilities is empty"):
        spec("iid", facilities=()).validate(TASKS)


def test_duplicate_facility():
    with pytest.raises(ChemFLError, match="names a facility twice"):
        spec("iid", facilities=("polaris", "aurora", "polaris")).validate(TASKS)


@pytest.mark.parametrize("sizes", [(), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0, 1.0, 1.0)])
def test_sizes_count_must_match_facilities(sizes):
    with pytest.raises(ChemFLError, match=f"gives {len(sizes)} shares for 4 facilities"):
        spec("sizes", sizes=sizes).validate(TASKS)


@pytest.mark.parametrize("sizes", [(1.0, 0.0, 1.0, 1.0), (1.0, -2.0, 1.0, 1.0)])
def test_sizes_must_be_positive(sizes):
    with pytest.raises(ChemFLError, match="every share must be > 0"):
        spec("sizes", sizes=sizes).validate(TASKS)


def test_task_map_naming_a_task_not_built():
    with pytest.raises(ChemFLError, match=r"not being built: \['task9'\]"):
        spec("by-task", task_map={**BY_TASK, "task9": "polaris"}).validate(TASKS)


def test_task_map_missing_a_task():
    task_map = {task: name for task, name in BY_TASK.items() if task != "task3"}
    task_map["task0"] = "frontier"
    with pytest.raises(ChemFLError, match=r"no facility for task\(s\) \['task3'\]"):
        spec("by-task", task_map=task_map).validate(TASKS)


def test_task_map_naming_an_unknown_facility():
    with pytest.raises(ChemFLError, match=r"not in data.facilities: \['summit'\]"):
        spec("by-task", task_map={**BY_TASK, "task5": "summit"}).validate(TASKS)


@pytest.mark.parametrize("text", ["task0", "task0=", "=polaris", "task0=polaris,task1", " = "])
def test_bad_task_map_entries(text):
    with pytest.raises(ChemFLError, match="is not 'task=facility'"):
        parse_task_map(text)


def test_parse_task_map():
    assert parse_task_map(" task0 = polaris , task1=aurora,, ") == {"task0": "polaris", "task1": "aurora"}
    assert parse_task_map("") == {}


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_valid_specs_pass_validation(scheme):
    SCHEMES[scheme].validate(TASKS)
