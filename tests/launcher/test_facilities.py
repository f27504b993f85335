"""The facilities file: every bad input is refused before anything is rendered, with a message
that names the facility, the problem and the fix."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import tomli_w

from chemfl.errors import ChemFLError
from chemfl.launcher.facilities import (
    format_walltime,
    load_facilities,
    parse_plan,
    parse_walltime,
    supernode_count,
    supernode_key_name,
    trainer_ranks_per_node,
)
from chemfl.launcher.profiles import PROFILES

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "four-facilities" / "facilities.toml"
RUN_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "laptop-fedbuff.toml"
ENDPOINT = "2b4f2c1e-8d3a-4f5e-9a6b-0c1d2e3f4a5b"
ROCM_SETUP = ["module load PrgEnv-gnu rocm/6.2.4 craype-accel-amd-gfx90a"]


def plan_table(**facility: object) -> dict:
    """A valid one-facility table (Polaris, debug queue, per-job layout with a recipe); keyword arguments
    replace facility keys (underscores for dashes; None removes the key)."""
    table = {
        "superlink": {"address": "fl.example.org:443", "root-certificates": "~/ca.crt", "keys-dir": "~/keys"},
        "facilities": {
            "polaris": {
                "profile": "polaris",
                "account": "MyProject",
                "queue": "debug",
                "walltime": "01:00:00",
                "data-path": "/eagle/MyProject/partitions/polaris",
                "recipe": str(RUN_RECIPE),
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
    assert [facility.layout for facility in plan.facilities] == ["per-job"] * 4
    assert [facility.recipe for facility in plan.facilities] == [str(RUN_RECIPE)] * 4  # relative to the file
    assert [facility.trainer_backend for facility in plan.facilities] == ["nccl", "xccl", "nccl", "nccl"]
    assert [supernode_count(facility) for facility in plan.facilities] == [1, 1, 1, 1]
    assert [facility.supernodes_per_node for facility in plan.facilities] == [4, 12, 8, 4]  # per-gpu, if chosen
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
    assert (facility.layout, facility.trainer_backend, facility.resubmit_note) == ("per-job", "nccl", "")
    assert facility.trainer_env == polaris.trainer_env
    assert supernode_count(facility) == 1  # per-job: one SuperNode, the trainer on every GPU
    assert trainer_ranks_per_node(facility) == 4
    assert supernode_key_name("polaris", 3) == "polaris-3"


def test_per_gpu_layout_has_a_supernode_per_gpu():
    facility = parse_plan(plan_table(layout="per-gpu", recipe=None)).facilities[0]
    assert (facility.layout, facility.supernodes_per_node, supernode_count(facility)) == ("per-gpu", 4, 4)
    assert facility.recipe == "" and facility.trainer_env == ()


def test_generic_profiles_take_gpus_and_pinning_from_the_file():
    table = plan_table(profile="slurm", gpus_per_node=2, gpu_pinning="srun", queue="gpu")
    facility = parse_plan(table).facilities[0]
    assert (facility.profile.name, facility.profile.gpus_per_node, facility.profile.gpu_pinning) == ("slurm", 2, "srun")
    assert facility.supernodes_per_node == 2
    assert trainer_ranks_per_node(facility) == 2 and facility.trainer_backend == "auto"


# --- the per-job layout: recipe, trainer backend and settings -----------------------------------------


def test_per_job_needs_a_recipe():
    refused(plan_table(recipe=None), "facility polaris", "add recipe =", "flwr run", 'layout = "per-gpu"')


def test_relative_recipe_resolves_against_the_facilities_file(tmp_path, monkeypatch):
    folder = tmp_path / "site"
    (folder / "recipes").mkdir(parents=True)
    (folder / "recipes" / "run.toml").write_text('run-name = "x"\n')
    path = folder / "facilities.toml"
    path.write_text(tomli_w.dumps(plan_table(recipe="recipes/run.toml")))
    monkeypatch.chdir(tmp_path)  # not the file's folder
    facility = load_facilities(path).facilities[0]
    assert facility.recipe == str(folder / "recipes" / "run.toml")


def test_missing_relative_recipe(tmp_path):
    path = tmp_path / "facilities.toml"
    path.write_text(tomli_w.dumps(plan_table(recipe="nowhere.toml")))
    with pytest.raises(ChemFLError) as caught:
        load_facilities(path)
    assert 'recipe "nowhere.toml" is not a file' in str(caught.value)
    assert str(tmp_path / "nowhere.toml") in str(caught.value)


def test_recipe_must_be_toml(tmp_path):
    (tmp_path / "broken.toml").write_text("[run\n")
    refused(plan_table(recipe=str(tmp_path / "broken.toml")), "not valid TOML")


def test_a_recipe_at_the_facility_only_is_kept_as_written():
    facility = parse_plan(plan_table(recipe="~/chemfl/recipes/run.toml")).facilities[0]
    assert facility.recipe == "~/chemfl/recipes/run.toml"


@pytest.mark.parametrize("key", ["recipe", "trainer_backend", "trainer_env"])
def test_trainer_keys_belong_to_the_per_job_layout(key):
    values = {"recipe": str(RUN_RECIPE), "trainer_backend": "gloo", "trainer_env": {"NCCL_DEBUG": "INFO"}}
    table = plan_table(layout="per-gpu", **{"recipe": None, key: values[key]})
    refused(table, "facility polaris", 'layout = "per-job"', f"remove {key.replace('_', '-')}")


def test_unknown_layout():
    refused(plan_table(layout="per-node"), 'layout "per-node" is unknown', "per-job", "per-gpu")


def test_supernodes_per_node_belongs_to_the_per_gpu_layout():
    refused(plan_table(supernodes_per_node=2), "supernodes-per-node is for layout", 'set layout = "per-gpu"')


def test_trainer_backend_default_and_override():
    assert parse_plan(plan_table(profile="aurora")).facilities[0].trainer_backend == "xccl"
    assert parse_plan(plan_table(trainer_backend="gloo")).facilities[0].trainer_backend == "gloo"
    refused(plan_table(trainer_backend="mpi"), 'trainer-backend "mpi" is unknown', "nccl", "xccl")


def test_trainer_env_adds_replaces_and_drops_settings():
    env = {"NCCL_DEBUG": "INFO", "NCCL_CROSS_NIC": "0", "FI_CXI_DISABLE_HOST_REGISTER": ""}
    facility = parse_plan(plan_table(trainer_env=env)).facilities[0]
    values = {setting.name: setting.value for setting in facility.trainer_env}
    assert values["NCCL_DEBUG"] == "INFO" and values["NCCL_CROSS_NIC"] == "0"
    assert "FI_CXI_DISABLE_HOST_REGISTER" not in values
    assert values["NCCL_NET"] == "AWS Libfabric"  # the profile's, untouched


@pytest.mark.parametrize("env", [{"NCCL DEBUG": "INFO"}, {"NCCL_DEBUG": 1}, {"NCCL_DEBUG": 'a"b'}])
def test_bad_trainer_env(env):
    refused(plan_table(trainer_env=env), "facility polaris", "trainer-env")


@pytest.mark.parametrize("name", ["polaris", "aurora", "frontier", "perlmutter"])
def test_site_profiles_cite_a_source_for_every_trainer_setting(name):
    profile = PROFILES[name]
    assert profile.trainer_launch and profile.trainer_launch_source.startswith("hpc.md")
    for setting in profile.trainer_env + profile.node_local_dirs:
        assert setting.source, setting


# --- queue rules -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("profile", "queue", "nodes", "fragments"),
    [
        ("polaris", "prod", 1, ["queue prod on polaris takes 10-496 nodes", "nodes = 1", "debug"]),
        ("polaris", "debug", 3, ["queue debug on polaris takes 1-2 nodes", "debug-scaling", "preemptable"]),
        ("polaris", "capacity", 5, ["queue capacity on polaris takes 1-4 nodes"]),
        ("aurora", "debug-scaling", 1, ["queue debug-scaling on aurora takes 2 or more nodes", "capacity"]),
        ("aurora", "prod", 16, ["queue prod on aurora takes 256 or more nodes"]),
        ("frontier", "extended", 65, ["queue extended on frontier takes 1-64 nodes"]),
    ],
)
def test_queue_node_limits(profile, queue, nodes, fragments):
    extra = {"setup": ROCM_SETUP} if profile == "frontier" else {}
    refused(plan_table(profile=profile, queue=queue, nodes=nodes, walltime="00:30:00", **extra), *fragments)


@pytest.mark.parametrize(
    ("profile", "queue", "nodes"),
    [("polaris", "prod", 10), ("polaris", "debug", 2), ("aurora", "debug-scaling", 2), ("frontier", "extended", 64)],
)
def test_queue_node_limits_let_fitting_jobs_through(profile, queue, nodes):
    extra = {"setup": ROCM_SETUP} if profile == "frontier" else {}
    facility = parse_plan(plan_table(profile=profile, queue=queue, nodes=nodes, **extra)).facilities[0]
    assert facility.nodes == nodes


def test_frontier_debug_is_never_resubmitted():
    table = plan_table(profile="frontier", queue="debug", setup=ROCM_SETUP)
    facility = parse_plan(table).facilities[0]
    assert facility.max_resubmits == 0
    assert "forbids job chaining" in facility.resubmit_note
    refused(
        plan_table(profile="frontier", queue="debug", setup=ROCM_SETUP, max_resubmits=2),
        "max-resubmits = 2",
        "forbids job chaining",
        "set max-resubmits = 0",
    )
    assert parse_plan(plan_table(profile="frontier", queue="batch", setup=ROCM_SETUP)).facilities[0].max_resubmits == 3


def test_frontier_needs_setup_with_a_pinned_rocm():
    refused(plan_table(profile="frontier", queue="batch"), "no setup lines", "rocm/<X.Y.Z>", "torch.version.hip")
    refused(
        plan_table(profile="frontier", queue="batch", setup=["module load PrgEnv-gnu rocm craype-accel-amd-gfx90a"]),
        "loads rocm without a version",
        "rocm/X.Y.Z",
    )


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
        plan_table(supernodes_per_node=5, layout="per-gpu", recipe=None),
        "facility polaris",
        "supernodes-per-node = 5",
        "4 GPU",
        "between 1 and 4",
    )


def test_aurora_counts_tiles():
    table = plan_table(profile="aurora", supernodes_per_node=13, layout="per-gpu", recipe=None)
    refused(table, "12 GPU tile", "between 1 and 12")


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
