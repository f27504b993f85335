"""Rendered batch scripts: goldens per profile, the properties that matter (directives, one SuperNode
per GPU with its own port, FLWR_HOME and pinning, proxies, a stop before the walltime), bash syntax,
and a run of each start-up style with stand-in commands (srun, mpiexec, flower-supernode ...).

Regenerate the goldens after a deliberate template change with CHEMFL_UPDATE_GOLDEN=1, then read
the diff: they are the scripts users will submit.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from chemfl.launcher.commands.submit import write_launch_scripts
from chemfl.launcher.facilities import Facility, LaunchPlan, parse_plan
from chemfl.launcher.render import render_body, render_script, stop_margin_seconds

GOLDEN = Path(__file__).with_name("golden")
TLS_SUPERLINK = {
    "address": "fl.example.org:443",
    "root-certificates": "~/chemfl/certs/ca.crt",
    "keys-dir": "~/chemfl/keys",
}
LOCAL_SUPERLINK = {"address": "127.0.0.1:9092", "insecure": True}
VENV = "source ~/chemfl/.venv/bin/activate"

# One facility per golden, chosen so that together they cover every start-up style: a loop on one
# node (polaris, perlmutter, pbs, local), mpiexec over nodes (aurora), srun over nodes (slurm), and
# one srun task per GCD (frontier).
GOLDEN_FACILITIES: dict[str, dict] = {
    "polaris": {
        "profile": "polaris",
        "account": "MyProject",
        "queue": "debug",
        "walltime": "01:00:00",
        "setup": ["module use /soft/modulefiles", "module load conda", VENV],
        "data-path": "/eagle/MyProject/chemfl/partitions/polaris",
    },
    "aurora": {
        "profile": "aurora",
        "account": "MyProject",
        "queue": "capacity",
        "nodes": 2,
        "walltime": "06:00:00",
        "setup": ["module load frameworks", VENV],
        "data-path": "/lus/flare/projects/MyProject/chemfl/partitions/aurora",
        "directives": ["-m n"],
    },
    "frontier": {
        "profile": "frontier",
        "account": "MyProject",
        "queue": "debug",
        "nodes": 2,
        "walltime": "02:00:00",
        "setup": ["module load PrgEnv-gnu rocm craype-accel-amd-gfx90a", VENV],
        "data-path": "/lustre/orion/MyProject/proj-shared/chemfl/partitions/frontier",
    },
    "perlmutter": {
        "profile": "perlmutter",
        "account": "MyProject",
        "queue": "regular",
        "walltime": "04:00:00",
        "supernodes-per-node": 2,
        "setup": ["module load conda", VENV],
        "data-path": "$PSCRATCH/chemfl/partitions/perlmutter",
    },
    "pbs": {
        "profile": "pbs",
        "account": "MyProject",
        "queue": "gpu",
        "walltime": "12:00:00",
        "gpus-per-node": 2,
        "setup": [VENV],
        "proxy": "",
        "data-path": "/scratch/chemfl/partitions/pbs",
        "directives": ["-l mem=64gb"],
    },
    "slurm": {
        "profile": "slurm",
        "account": "MyProject",
        "queue": "gpu",
        "nodes": 3,
        "walltime": "08:00:00",
        "gpus-per-node": 4,
        "supernodes-per-node": 2,
        "setup": [VENV],
        "proxy": "http://proxy.example.org:3128",
        "data-path": "/scratch/chemfl/partitions/slurm",
        "directives": ["--gres=gpu:4"],
    },
    "local": {"profile": "local", "walltime": "00:10:00", "gpus-per-node": 2, "data-path": "partitions/local"},
}
DIRECTIVES = {
    "polaris": [
        "#PBS -A MyProject",
        "#PBS -q debug",
        "#PBS -l select=1:system=polaris",
        "#PBS -l walltime=01:00:00",
        "#PBS -l filesystems=home:eagle",
    ],
    "aurora": [
        "#PBS -A MyProject",
        "#PBS -q capacity",
        "#PBS -l select=2",
        "#PBS -l walltime=06:00:00",
        "#PBS -l filesystems=home:flare",
        "#PBS -m n",
    ],
    "frontier": ["#SBATCH --account=MyProject", "#SBATCH --qos=debug", "#SBATCH --nodes=2", "#SBATCH --time=02:00:00"],
    "perlmutter": [
        "#SBATCH --account=MyProject",
        "#SBATCH --qos=regular",
        "#SBATCH --nodes=1",
        "#SBATCH --time=04:00:00",
        "#SBATCH --constraint=gpu",
        "#SBATCH --gpus-per-node=4",
    ],
    "pbs": ["#PBS -A MyProject", "#PBS -q gpu", "#PBS -l select=1", "#PBS -l walltime=12:00:00", "#PBS -l mem=64gb"],
    "slurm": [
        "#SBATCH --account=MyProject",
        "#SBATCH --partition=gpu",
        "#SBATCH --nodes=3",
        "#SBATCH --time=08:00:00",
        "#SBATCH --gres=gpu:4",
    ],
    "local": [],
}


@pytest.fixture(autouse=True)
def in_a_folder_with_local_shards(tmp_path, monkeypatch):
    """A local facility's data path must exist; it is given relative to this folder."""
    (tmp_path / "partitions" / "local").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)


def plan_for(name: str, **changes: object) -> LaunchPlan:
    facility = {**GOLDEN_FACILITIES[name], **{key.replace("_", "-"): value for key, value in changes.items()}}
    superlink = LOCAL_SUPERLINK if facility["profile"] == "local" else TLS_SUPERLINK
    return parse_plan({"superlink": dict(superlink), "facilities": {name: facility}})


def only(plan: LaunchPlan) -> Facility:
    (facility,) = plan.facilities
    return facility


def directive_lines(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith(("#PBS", "#SBATCH"))]


def supernode_lines(script: str) -> list[str]:
    return [line.strip() for line in script.splitlines() if line.strip().startswith("--")]


@pytest.mark.parametrize("name", GOLDEN_FACILITIES)
def test_script_matches_golden(name, tmp_path):
    plan = plan_for(name)
    # The local data path is made absolute: name this test's folder the same in every run.
    script = render_script(plan, only(plan)).replace(str(tmp_path.resolve()), "/work")
    golden = GOLDEN / f"{name}.sh"
    if os.environ.get("CHEMFL_UPDATE_GOLDEN") == "1":
        golden.write_text(script)
    assert golden.exists(), f"no golden for {name}: run with CHEMFL_UPDATE_GOLDEN=1 and read what it wrote"
    assert script == golden.read_text(), f"{name}.sh differs from its golden; if deliberate, CHEMFL_UPDATE_GOLDEN=1"


@pytest.mark.parametrize("name", GOLDEN_FACILITIES)
def test_directives_come_first_and_carry_no_comments(name):
    plan = plan_for(name)
    lines = render_script(plan, only(plan)).splitlines()
    directives = directive_lines("\n".join(lines))
    assert lines[0] == "#!/bin/bash"
    assert lines[1 : 1 + len(directives)] == directives  # one block right after the shebang
    for expected in DIRECTIVES[name]:
        assert expected in directives
    for line in directives:
        assert "#" not in line[1:], f"ALCF: no comment on a directive line: {line}"


@pytest.mark.parametrize("name", GOLDEN_FACILITIES)
def test_body_is_the_script_without_directives(name):
    plan = plan_for(name)
    script, body = render_script(plan, only(plan)), render_body(plan, only(plan))
    assert [line for line in script.splitlines() if line not in directive_lines(script)] == body.splitlines()
    assert not directive_lines(body)


@pytest.mark.parametrize("name", GOLDEN_FACILITIES)
def test_script_and_body_are_valid_bash(name, tmp_path):
    plan = plan_for(name)
    for kind, text in (("script", render_script(plan, only(plan))), ("body", render_body(plan, only(plan)))):
        path = tmp_path / f"{name}-{kind}.sh"
        path.write_text(text)
        checked = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert checked.returncode == 0, f"{kind}: {checked.stderr}"


@pytest.mark.parametrize("name", GOLDEN_FACILITIES)
def test_common_body_parts(name):
    plan = plan_for(name)
    facility = only(plan)
    script = render_script(plan, facility)
    assert "set -euo pipefail" in script
    for line in facility.setup:
        assert f"\n{line}\n" in script
    assert "export CHEMFL_JOB_END_TIME=" in script
    assert "job-end-time=${CHEMFL_JOB_END_TIME}" in script
    assert f"data-slice='${{index}}/{facility.nodes * facility.supernodes_per_node}'" in script
    assert f"facility='{name}'" in script
    assert "timeout --signal=TERM --kill-after=30" in script
    last = script.rstrip().splitlines()[-1]
    assert last == "start_node 0" or last.startswith('  bash -c "set -euo pipefail; $(declare -f start_supernode')


def test_proxies_only_where_a_proxy_is_set():
    polaris = render_script(plan_for("polaris"), only(plan_for("polaris")))
    for variable in ("http_proxy", "https_proxy", "grpc_proxy"):
        assert f"export {variable}=http://proxy.alcf.anl.gov:3128\n" in polaris
    assert "export no_proxy=localhost,127.0.0.1\n" in polaris
    assert "export no_grpc_proxy=localhost,127.0.0.1,::1\n" in polaris
    for name in ("perlmutter", "pbs", "local"):
        assert "proxy=" not in render_script(plan_for(name), only(plan_for(name)))


def test_tls_superlink_flags():
    script = render_script(plan_for("polaris"), only(plan_for("polaris")))
    flags = supernode_lines(script)
    assert "--superlink fl.example.org:443 \\" in flags
    assert '--root-certificates "$HOME/chemfl/certs/ca.crt" \\' in flags  # flwr does not expand ~ there
    assert '--auth-supernode-private-key "$HOME/chemfl/keys/polaris-${index}" \\' in flags
    assert "--insecure \\" not in flags


def test_local_superlink_flags():
    flags = supernode_lines(render_script(plan_for("local"), only(plan_for("local"))))
    assert "--insecure \\" in flags
    assert not any(flag.startswith(("--root-certificates", "--auth-supernode-private-key")) for flag in flags)


@pytest.mark.parametrize(
    ("name", "pinning"),
    [
        ("polaris", 'CUDA_VISIBLE_DEVICES="$gpu"'),
        ("perlmutter", 'CUDA_VISIBLE_DEVICES="$gpu"'),
        ("aurora", 'ZE_AFFINITY_MASK="$gpu"'),
        ("pbs", 'CUDA_VISIBLE_DEVICES="$gpu"'),
    ],
)
def test_pinning_by_variable(name, pinning):
    script = render_script(plan_for(name), only(plan_for(name)))
    assert f'FLWR_HOME="$flwr_home" {pinning} timeout' in script
    assert ("ZE_FLAT_DEVICE_HIERARCHY=FLAT" in script) == (name == "aurora")


def test_frontier_pins_with_srun_one_task_per_gcd():
    script = render_script(plan_for("frontier"), only(plan_for("frontier")))
    assert "srun --nodes=2 --ntasks-per-node=8 --cpus-per-task=7 --gpus-per-task=1 --gpu-bind=closest" in script
    assert "CUDA_VISIBLE_DEVICES" not in script and "ZE_AFFINITY_MASK" not in script


def test_local_has_no_scheduler_and_no_pinning():
    script = render_script(plan_for("local"), only(plan_for("local")))
    assert not directive_lines(script) and "srun" not in script and "mpiexec" not in script
    assert 'FLWR_HOME="$flwr_home" timeout' in script


def test_local_facilities_on_one_machine_get_distinct_ports():
    facilities = {name: {**GOLDEN_FACILITIES["local"], "supernodes-per-node": 2} for name in ("a", "b")}
    plan = parse_plan({"superlink": dict(LOCAL_SUPERLINK), "facilities": facilities})
    assert "--port $(( 9094 + gpu ))" in render_script(plan, plan.facilities[0])
    assert "--port $(( 9096 + gpu ))" in render_script(plan, plan.facilities[1])


@pytest.mark.parametrize(("walltime", "margin"), [("01:00:00", 120), ("00:10:00", 30), ("48:00:00", 120)])
def test_supernodes_stop_before_the_walltime(walltime, margin):
    plan = plan_for("polaris", walltime=walltime, queue="preemptable")
    script = render_script(plan, only(plan))
    assert stop_margin_seconds(only(plan).walltime_seconds) == margin
    assert f"export CHEMFL_STOP_MARGIN={margin}\n" in script
    assert "CHEMFL_JOB_END_TIME - $(date +%s) - CHEMFL_STOP_MARGIN" in script


def test_write_scripts_writes_executable_files_atomically(tmp_path):
    facilities = {name: GOLDEN_FACILITIES[name] for name in ("polaris", "frontier", "perlmutter")}
    plan = parse_plan({"superlink": dict(TLS_SUPERLINK), "facilities": facilities})
    written = {
        r.facility.name: r.script for r in write_launch_scripts(plan, list(plan.facilities), tmp_path / "scripts")
    }
    assert list(written) == ["polaris", "frontier", "perlmutter"]
    for facility in plan.facilities:
        path = written[facility.name]
        assert path == tmp_path / "scripts" / f"{facility.name}.sh"
        assert path.read_text() == render_script(plan, facility)
        assert path.stat().st_mode & stat.S_IXUSR
    assert sorted(p.name for p in (tmp_path / "scripts").iterdir()) == ["frontier.sh", "perlmutter.sh", "polaris.sh"]


# --- A run of each start-up style, with stand-ins for the site's commands -------------------------

STAND_INS = {
    # Records what each SuperNode was started with.
    "flower-supernode": f"""#!{sys.executable}
import json, os, sys, uuid
keep = ("FLWR_HOME", "CUDA_VISIBLE_DEVICES", "ZE_AFFINITY_MASK", "ZE_FLAT_DEVICE_HIERARCHY", "PALS_NODEID",
        "SLURM_NODEID", "SLURM_LOCALID", "SLURM_PROCID", "https_proxy", "grpc_proxy", "no_grpc_proxy",
        "CHEMFL_TIMEOUT", "SITE_SETUP_RAN")
record = {{"argv": sys.argv[1:], "env": {{key: os.environ.get(key) for key in keep}}}}
with open(os.path.join(os.environ["RECORDS"], uuid.uuid4().hex + ".json"), "w") as stream:
    json.dump(record, stream)
""",
    # Passes its duration on to the stand-in SuperNode, then runs it.
    "timeout": """#!/bin/bash
while [[ $1 == --* ]]; do shift; done
export CHEMFL_TIMEOUT=$1; shift
exec "$@"
""",
    # Runs the command once per task, with the task numbering srun gives.
    "srun": """#!/bin/bash
nodes=1 per_node=1
while [[ $1 == --* ]]; do
  case $1 in --nodes=*) nodes=${1#*=} ;; --ntasks-per-node=*) per_node=${1#*=} ;; esac
  shift
done
for ((node = 0; node < nodes; node++)); do
  for ((local = 0; local < per_node; local++)); do
    SLURM_NODEID=$node SLURM_LOCALID=$local SLURM_PROCID=$((node * per_node + local)) "$@" &
  done
done
wait
""",
    # Runs the command once per rank, numbered as Cray PALS does.
    "mpiexec": """#!/bin/bash
ranks=1
while [[ $1 == -* ]]; do
  case $1 in -n) ranks=$2; shift ;; --ppn) shift ;; esac
  shift
done
for ((rank = 0; rank < ranks; rank++)); do PALS_NODEID=$rank PMI_RANK=$rank "$@" & done
wait
""",
    "module": """#!/bin/bash
exit 0
""",
}


def run_with_stand_ins(script: str, tmp_path: Path, **environment: str) -> tuple[list[dict], str]:
    """Run `script` with bash and the stand-ins first on PATH: what each SuperNode got, and stderr."""
    bin_dir, records, home = tmp_path / "bin", tmp_path / "records", tmp_path / "home"
    for folder in (bin_dir, records, home, tmp_path / "tmp"):
        folder.mkdir(exist_ok=True)
    for name, text in STAND_INS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (home / "chemfl" / ".venv" / "bin").mkdir(parents=True)
    (home / "chemfl" / ".venv" / "bin" / "activate").write_text("export SITE_SETUP_RAN=1\n")
    (tmp_path / "job.sh").write_text(script)
    environment = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(home),
        "TMPDIR": str(tmp_path / "tmp"),
        "RECORDS": str(records),
        "PSCRATCH": "/pscratch/u",
        **environment,
    }
    done = subprocess.run(
        ["bash", str(tmp_path / "job.sh")], env=environment, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(path.read_text()) for path in records.iterdir()], done.stderr


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize("name", ["aurora", "frontier", "slurm", "perlmutter", "local"])
def test_every_supernode_starts_once_with_its_own_index_port_and_home(name, tmp_path):
    plan = plan_for(name)
    facility = only(plan)
    records, _ = run_with_stand_ins(render_script(plan, facility), tmp_path)
    total = facility.nodes * facility.supernodes_per_node
    assert len(records) == total

    configs = [parse_config_args([flag(record["argv"], "--node-config")]) for record in records]
    assert sorted(int(config["data-slice"].split("/")[0]) for config in configs) == list(range(total))
    for config in configs:
        assert config["facility"] == name
        assert config["data-slice"].endswith(f"/{total}")
        assert isinstance(config["job-end-time"], int)
        assert config["data-path"] == facility.data_path.replace("$PSCRATCH", "/pscratch/u")

    homes = [record["env"]["FLWR_HOME"] for record in records]
    assert len(set(homes)) == total and all(home.startswith(str(tmp_path / "tmp")) for home in homes)
    node_of = {"aurora": "PALS_NODEID", "frontier": "SLURM_NODEID", "slurm": "SLURM_NODEID"}.get(name)
    ports = {(record["env"][node_of] if node_of else "0", flag(record["argv"], "--port")) for record in records}
    assert len(ports) == total  # distinct on every node
    assert {int(port) for _, port in ports} == set(range(9094, 9094 + facility.supernodes_per_node))

    walltime, margin = facility.walltime_seconds, stop_margin_seconds(facility.walltime_seconds)
    for record in records:
        assert walltime - margin - 30 < int(record["env"]["CHEMFL_TIMEOUT"]) <= walltime - margin
        index = int(parse_config_args([flag(record["argv"], "--node-config")])["data-slice"].split("/")[0])
        local_gpu = int(flag(record["argv"], "--port")) - 9094
        assert index % facility.supernodes_per_node == local_gpu
        pinned = record["env"]["ZE_AFFINITY_MASK" if name == "aurora" else "CUDA_VISIBLE_DEVICES"]
        assert pinned == (str(local_gpu) if facility.profile.gpu_pinning in ("cuda", "ze") else None)
        if name != "local":
            assert record["env"]["SITE_SETUP_RAN"] == "1"
            assert flag(record["argv"], "--auth-supernode-private-key") == f"{tmp_path}/home/chemfl/keys/{name}-{index}"
    if name == "aurora":
        assert all(record["env"]["ZE_FLAT_DEVICE_HIERARCHY"] == "FLAT" for record in records)
        assert all(record["env"]["grpc_proxy"] == "http://proxy.alcf.anl.gov:3128" for record in records)


def test_no_supernode_starts_when_the_job_is_about_to_end(tmp_path):
    plan = plan_for("slurm", nodes=1)
    soon = str(int(time.time()) + stop_margin_seconds(only(plan).walltime_seconds) - 5)
    records, stderr = run_with_stand_ins(render_script(plan, only(plan)), tmp_path, SLURM_JOB_END_TIME=soon)
    assert records == []
    assert "SuperNode 0 not started: the job ends in under 120 s" in stderr
