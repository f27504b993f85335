"""The facilities file: every bad input is refused before anything is rendered, with a message
that names the facility, the problem and the fix."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from chemfl.errors import ChemFLError
from chemfl.launcher.facilities import (
    format_walltime,
    load_facilities,
    parse_plan,
    parse_walltime,
    supernode_count,
    supernode_key_name,
)
from chemfl.launcher.profiles import PROFILES

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "four-facilities" / "facilities.toml"
ENDPOINT = "2b4f2c1e-8d3a-4f5e-9a6b-0c1d2e3f4a5b"


def plan_table(**facility: object) -> dict:
    """A valid one-facility table (Polaris, debug queue); keyword arguments replace facility keys
    (underscores for dashes; None removes the key)."""
    table = {
        "superlink": {"address": "fl.example.org:443", "root-certificates": "~/ca.crt", "keys-dir": "~/keys"},
        "facilities": {
            "polaris": {
                "profile": "polaris",
                "account": "MyProject",
                "queue": "debug",
                "walltime": "01:00:00",
                "data-path": "/eagle/MyProject/partitions/polaris",
            }
        },
    }
    for key, value in facility.items():
        key = key.replace("_", "-")
        if value is None:
            table["facilities"]["polaris"].pop(key)
        else:
            table["facilities"]["polaris"][key] = value
    return table


def refused(table: dict, *fragments: str) -> str:
    """parse_plan raises ChemFLError whose message contains every fragment."""
    with pytest.raises(ChemFLError) as caught:
        parse_plan(table)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_recipe_for_the_four_facilities_loads():
    plan = load_facilities(RECIPE)
    assert [facility.name for facility in plan.facilities] == ["polaris", "aurora", "frontier", "perlmutter"]
    assert [facility.supernodes_per_node for facility in plan.facilities] == [4, 12, 8, 4]
    assert plan.superlink.address.endswith(":443") and not plan.superlink.insecure


def test_defaults_come_from_the_profile():
    table = plan_table(queue=None)
    facility = parse_plan(table).facilities[0]
    polaris = PROFILES["polaris"]
    assert facility.queue == polaris.default_queue
    assert facility.supernodes_per_node == polaris.gpus_per_node
    assert facility.proxy == polaris.default_proxy
    assert facility.setup == polaris.default_setup
    assert (facility.nodes, facility.backend, facility.max_resubmits, facility.resubmit_backoff_seconds) == (
        1,
        "cli",
        3,
        60.0,
    )
    assert supernode_count(facility) == 4
    assert supernode_key_name("polaris", 3) == "polaris-3"


def test_generic_profiles_take_gpus_and_pinning_from_the_file():
    table = plan_table(profile="slurm", gpus_per_node=2, gpu_pinning="srun", queue="gpu")
    facility = parse_plan(table).facilities[0]
    assert (facility.profile.name, facility.profile.gpus_per_node, facility.profile.gpu_pinning) == ("slurm", 2, "srun")
    assert facility.supernodes_per_node == 2


def test_walltime_round_trips():
    assert parse_walltime("168:00:00") == 168 * 3600
    assert format_walltime(parse_walltime("01:02:03")) == "01:02:03"


def test_unknown_profile_lists_the_known_ones():
    refused(plan_table(profile="polarus"), "facility polaris", '"polarus" is unknown', ", ".join(PROFILES))


def test_missing_account():
    refused(plan_table(account=None), "facility polaris", "no account", "account =")


def test_local_needs_no_account(tmp_path):
    table = plan_table(profile="local", account=None, queue=None, data_path=str(tmp_path))
    assert parse_plan(table).facilities[0].account == ""


def test_walltime_over_the_queue_cap_names_the_cap_and_longer_queues():
    refused(
        plan_table(walltime="02:00:00"),
        "facility polaris",
        "02:00:00 is over queue debug's cap of 01:00:00",
        "preemptable",
        "capacity",
    )


def test_walltime_over_every_cap():
    refused(
        plan_table(walltime="200:00:00", queue="capacity"), "over queue capacity's cap of 168:00:00", "no other queue"
    )


@pytest.mark.parametrize("walltime", ["1h", "01:60:00", "90", "1:00", ""])
def test_malformed_walltime(walltime):
    refused(plan_table(walltime=walltime), "facility polaris", "walltime", "HH:MM:SS")


def test_more_supernodes_than_gpus():
    refused(
        plan_table(supernodes_per_node=5), "facility polaris", "supernodes-per-node = 5", "4 GPU", "between 1 and 4"
    )


def test_aurora_counts_tiles():
    refused(plan_table(profile="aurora", supernodes_per_node=13), "12 GPU tile", "between 1 and 12")


@pytest.mark.parametrize("nodes", [0, -1])
def test_nodes_below_one(nodes):
    refused(plan_table(nodes=nodes), "facility polaris", f"nodes = {nodes}", "at least one node")


def test_unknown_key_suggests_the_right_one():
    refused(plan_table(wall_time="01:00:00"), "facility polaris", 'unknown key "wall-time"', 'did you mean "walltime"')


def test_generic_keys_are_unknown_to_builtin_profiles():
    refused(plan_table(gpu_pinning="ze"), "facility polaris", 'unknown key "gpu-pinning"')


def test_unknown_superlink_key():
    table = plan_table()
    table["superlink"]["root-certificate"] = "~/ca.crt"
    refused(table, "[superlink]", 'unknown key "root-certificate"', 'did you mean "root-certificates"')


def test_unknown_backend():
    refused(plan_table(backend="ssh"), "facility polaris", 'backend "ssh" is unknown', "cli, globus")


def test_globus_without_endpoint():
    refused(plan_table(backend="globus"), "facility polaris", "globus-endpoint", "endpoint UUID")


def test_globus_endpoint_not_a_uuid():
    refused(plan_table(backend="globus", globus_endpoint="my-endpoint"), "not an endpoint id (a UUID)")


def test_globus_with_endpoint_loads():
    facility = parse_plan(
        plan_table(backend="globus", globus_endpoint=ENDPOINT, globus_config={"queue": "debug"})
    ).facilities[0]
    assert (facility.backend, facility.globus_endpoint, facility.globus_config) == (
        "globus",
        ENDPOINT,
        {"queue": "debug"},
    )


def test_insecure_towards_a_remote_superlink():
    table = plan_table()
    table["superlink"] = {"address": "fl.example.org:9092", "insecure": True}
    refused(table, "[superlink]", "insecure = true", "localhost", "set insecure = false")


@pytest.mark.parametrize("address", ["localhost:9092", "127.0.0.1:9092", "[::1]:9092"])
def test_insecure_towards_localhost_is_allowed(address):
    table = plan_table()
    table["superlink"] = {"address": address, "insecure": True}
    assert parse_plan(table).superlink.insecure


def test_insecure_with_keys_is_refused_since_node_auth_needs_tls():
    table = plan_table()
    table["superlink"] = {"address": "127.0.0.1:9092", "insecure": True, "keys-dir": "~/keys"}
    refused(table, "keys-dir", "needs TLS")


def test_insecure_with_root_certificates():
    table = plan_table()
    table["superlink"] = {"address": "127.0.0.1:9092", "insecure": True, "root-certificates": "~/ca.crt"}
    refused(table, "root-certificates", "remove root-certificates")


def test_superlink_address_must_be_host_and_port():
    table = plan_table()
    table["superlink"]["address"] = "https://fl.example.org"
    refused(table, "[superlink]", "not host:port", "fl.example.org:443")


def test_local_data_path_must_exist(tmp_path):
    missing = tmp_path / "no-such-shard"
    refused(
        plan_table(profile="local", queue=None, data_path=str(missing)),
        "facility polaris",
        str(missing),
        "not a folder on this machine",
        "chemfl data build",
    )


def test_remote_data_path_is_not_checked():
    assert (
        parse_plan(plan_table(data_path="/nowhere/on/this/machine")).facilities[0].data_path
        == "/nowhere/on/this/machine"
    )


def test_local_with_several_nodes(tmp_path):
    refused(
        plan_table(profile="local", queue=None, nodes=2, data_path=str(tmp_path)),
        "facility polaris",
        "nodes = 2",
        "set nodes = 1",
    )


def test_srun_pinning_needs_slurm():
    refused(plan_table(profile="pbs", gpu_pinning="srun", queue="gpu"), "facility polaris", '"srun" needs Slurm')


def test_directive_with_its_prefix():
    refused(plan_table(directives=["#PBS -l place=scatter"]), "facility polaris", "the #PBS / #SBATCH prefix is added")


def test_path_that_cannot_be_quoted():
    refused(plan_table(data_path="/eagle/it's/here"), "facility polaris", "data-path", "quote")


def test_wrong_type():
    refused(plan_table(nodes="2"), "facility polaris", "nodes = '2' should be an integer")


def test_facility_name_must_suit_file_names():
    table = plan_table()
    table["facilities"]["my facility"] = table["facilities"].pop("polaris")
    refused(table, "facility my facility", "letters, digits")


def test_no_facilities():
    table = plan_table()
    table["facilities"] = {}
    refused(table, "no facilities", "[facilities.<name>]")


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ChemFLError, match="no such facilities file"):
        load_facilities(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[superlink\n")
    with pytest.raises(ChemFLError, match="not valid TOML"):
        load_facilities(broken)


def test_errors_from_a_file_carry_its_path(tmp_path):
    path = tmp_path / "facilities.toml"
    path.write_text(RECIPE.read_text().replace('walltime = "01:00:00"', 'walltime = "03:00:00"', 1))
    with pytest.raises(ChemFLError) as caught:
        load_facilities(path)
    assert str(caught.value).startswith(f"{path}: facility polaris: walltime 03:00:00 is over queue debug's cap")


def test_the_table_given_is_not_modified():
    table = plan_table()
    before = copy.deepcopy(table)
    parse_plan(table)
    assert table == before
