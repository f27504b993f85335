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
ROCM = "module load PrgEnv-gnu rocm/6.2.4 craype-accel-amd-gfx90a"  # 6.2.4: an example version
RECIPE = "~/chemfl/recipes/run.toml"  # a recipe at the facility (not on this machine): kept as written

# Layout per-job (the default): one SuperNode and one trainer per job. One facility per golden, together
# covering every trainer launcher: mpiexec with PALS (polaris, aurora, pbs), srun (frontier, perlmutter,
# slurm) and torchrun (local).
GOLDEN_FACILITIES: dict[str, dict] = {
    "polaris": {
        "profile": "polaris",
        "account": "MyProject",
        "queue": "debug",
        "nodes": 2,
        "walltime": "01:00:00",
        "setup": ["module use /soft/modulefiles", "module load conda", VENV],
        "data-path": "/eagle/MyProject/chemfl/partitions/polaris",
        "recipe": RECIPE,
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
        "recipe": RECIPE,
    },
    "frontier": {
        "profile": "frontier",
        "account": "MyProject",
        "queue": "debug",
        "nodes": 2,
        "walltime": "02:00:00",
        "setup": [ROCM, VENV],
        "data-path": "/lustre/orion/MyProject/proj-shared/chemfl/partitions/frontier",
        "recipe": RECIPE,
    },
    "perlmutter": {
        "profile": "perlmutter",
        "account": "MyProject",
        "queue": "regular",
        "walltime": "04:00:00",
        "setup": ["module load conda", VENV],
        "data-path": "$PSCRATCH/chemfl/partitions/perlmutter",
        "recipe": RECIPE,
        "trainer-env": {"NCCL_DEBUG": "WARN"},
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
        "recipe": RECIPE,
    },
    "slurm": {
        "profile": "slurm",
        "account": "MyProject",
        "queue": "gpu",
        "nodes": 3,
        "walltime": "08:00:00",
        "gpus-per-node": 4,
        "setup": [VENV],
        "proxy": "http://proxy.example.org:3128",
        "data-path": "/scratch/chemfl/partitions/slurm",
        "directives": ["--gres=gpu:4"],
        "recipe": RECIPE,
    },
    "local": {
        "profile": "local",
        "walltime": "00:10:00",
        "gpus-per-node": 2,
        "data-path": "partitions/local",
        "recipe": "recipe.toml",
    },
}
# Layout per-gpu: one SuperNode per GPU. Together they cover every start-up style: a loop on one node
# (polaris, perlmutter, pbs, local), mpiexec over nodes (aurora), srun over nodes (slurm), and one srun
# task per GCD (frontier).
PER_GPU_FACILITIES: dict[str, dict] = {
    name: {
        **{key: value for key, value in table.items() if key not in ("recipe", "trainer-env")},
        "layout": "per-gpu",
        **extra,
    }
    for name, table, extra in [
        ("polaris", GOLDEN_FACILITIES["polaris"], {"nodes": 1}),
        ("aurora", GOLDEN_FACILITIES["aurora"], {}),
        ("frontier", GOLDEN_FACILITIES["frontier"], {}),
        ("perlmutter", GOLDEN_FACILITIES["perlmutter"], {"supernodes-per-node": 2}),
        ("pbs", GOLDEN_FACILITIES["pbs"], {}),
        ("slurm", GOLDEN_FACILITIES["slurm"], {"supernodes-per-node": 2}),
        ("local", GOLDEN_FACILITIES["local"], {}),
    ]
}
# Every golden: "<profile>" (per-job) and "<profile>.per-gpu".
CASES: dict[str, tuple[str, dict]] = {
    **{name: (name, table) for name, table in GOLDEN_FACILITIES.items()},
    **{f"{name}.per-gpu": (name, table) for name, table in PER_GPU_FACILITIES.items()},
}
DIRECTIVES = {
    "polaris": [
        "#PBS -A MyProject",
        "#PBS -q debug",
        "#PBS -l select=2:system=polaris",
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
DIRECTIVES["polaris.per-gpu"] = [line.replace("select=2", "select=1") for line in DIRECTIVES["polaris"]]
for _name in PER_GPU_FACILITIES:
    DIRECTIVES.setdefault(f"{_name}.per-gpu", DIRECTIVES[_name])
DIRECTIVES["frontier"] = DIRECTIVES["frontier"] + ["#SBATCH --network=disable_rdzv_get"]  # RCCL (hpc.md)


@pytest.fixture(autouse=True)
def in_a_folder_with_local_shards(tmp_path, monkeypatch):
    """A local facility's data path and recipe must exist; they are given relative to this folder."""
    (tmp_path / "partitions" / "local").mkdir(parents=True)
    (tmp_path / "recipe.toml").write_text('run-name = "local"\n')
    monkeypatch.chdir(tmp_path)


def plan_for(case: str, **changes: object) -> LaunchPlan:
    """The plan of one golden case ("polaris", "polaris.per-gpu", ...), with keys changed (underscores for
    dashes; None removes a key)."""
    name, table = CASES[case]
    facility = dict(table)
    for key, value in changes.items():
        key = key.replace("_", "-")
        if value is None:
            facility.pop(key, None)
        else:
            facility[key] = value
    superlink = LOCAL_SUPERLINK if facility["profile"] == "local" else TLS_SUPERLINK
    return parse_plan({"superlink": dict(superlink), "facilities": {name: facility}})


def only(plan: LaunchPlan) -> Facility:
    (facility,) = plan.facilities
    return facility


def script_of(case: str, **changes: object) -> str:
    plan = plan_for(case, **changes)
    return render_script(plan, only(plan))


def directive_lines(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith(("#PBS", "#SBATCH"))]


def supernode_lines(script: str) -> list[str]:
    return [line.strip() for line in script.splitlines() if line.strip().startswith("--")]


@pytest.mark.parametrize("case", CASES)
def test_script_matches_golden(case, tmp_path):
    # The local data path and recipe are made absolute: name this test's folder the same in every run.
    script = script_of(case).replace(str(tmp_path.resolve()), "/work")
    golden = GOLDEN / f"{case}.sh"
    if os.environ.get("CHEMFL_UPDATE_GOLDEN") == "1":
        golden.write_text(script)
    assert golden.exists(), f"no golden for {case}: run with CHEMFL_UPDATE_GOLDEN=1 and read what it wrote"
    assert script == golden.read_text(), f"{case}.sh differs from its golden; if deliberate, CHEMFL_UPDATE_GOLDEN=1"


def test_every_golden_is_a_case():
    assert sorted(path.stem for path in GOLDEN.glob("*.sh")) == sorted(CASES)


@pytest.mark.parametrize("case", CASES)
def test_directives_come_first_and_carry_no_comments(case):
    lines = script_of(case).splitlines()
    directives = directive_lines("\n".join(lines))
    assert lines[0] == "#!/bin/bash"
    assert lines[1 : 1 + len(directives)] == directives  # one block right after the shebang
    for expected in DIRECTIVES[case]:
        assert expected in directives
    assert ("#SBATCH --network=disable_rdzv_get" in directives) == (case == "frontier")
    for line in directives:
        assert "#" not in line[1:], f"ALCF: no comment on a directive line: {line}"


@pytest.mark.parametrize("case", CASES)
def test_body_is_the_script_without_directives(case):
    plan = plan_for(case)
    script, body = render_script(plan, only(plan)), render_body(plan, only(plan))
    assert [line for line in script.splitlines() if line not in directive_lines(script)] == body.splitlines()
    assert not directive_lines(body)


@pytest.mark.parametrize("case", CASES)
def test_script_and_body_are_valid_bash(case, tmp_path):
    plan = plan_for(case)
    for kind, text in (("script", render_script(plan, only(plan))), ("body", render_body(plan, only(plan)))):
        path = tmp_path / f"{case}-{kind}.sh"
        path.write_text(text)
        checked = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert checked.returncode == 0, f"{kind}: {checked.stderr}"


@pytest.mark.parametrize("case", CASES)
def test_common_body_parts(case):
    plan = plan_for(case)
    facility = only(plan)
    script = render_script(plan, facility)
    assert "set -euo pipefail" in script
    for line in facility.setup:
        assert f"\n{line}\n" in script
    assert "job-end-time=${CHEMFL_JOB_END_TIME}" in script
    assert f"facility='{facility.name}'" in script
    assert "timeout --signal=TERM --kill-after=30" in script
    assert " --foreground " not in script.replace("(without --foreground)", "")  # services get their own group
    assert '--max-wait-time "$CHEMFL_CONNECT_WAIT" \\' in supernode_lines(script)
    assert script.rstrip().splitlines()[-1] == 'exit "$status"'
    if facility.layout == "per-job":
        assert "data-slice" not in script
        assert "trainer='unix:${CHEMFL_TRAINER_SOCKET}' trainer-secret-file='${CHEMFL_TRAINER_SECRET}'" in script
        assert script.index("chemfl trainer \\") < script.index("start_supernode 0 0 &")
    else:
        assert f"data-slice='${{index}}/{facility.nodes * facility.supernodes_per_node}'" in script
        assert "chemfl trainer" not in script


@pytest.mark.parametrize("case", CASES)
def test_the_job_clock_comes_before_the_site_setup(case):
    """Modules take a while to load: the job's end is counted from the script's start."""
    script = script_of(case)
    clock = script.index("export CHEMFL_JOB_END_TIME=")
    assert clock < script.index("set +u") if "set +u" in script else True
    assert clock < script.index("\n# --- Site environment") if "# --- Site environment" in script else True


def test_proxies_only_where_a_proxy_is_set():
    for case in ("polaris", "polaris.per-gpu"):
        polaris = script_of(case)
        for variable in ("http_proxy", "https_proxy"):
            assert f"export {variable}=http://proxy.alcf.anl.gov:3128\n" in polaris
        # appended to the site's no_proxy, not replacing it; grpc_proxy does nothing for the HTTP Fleet API
        assert 'export no_proxy="${no_proxy:+${no_proxy},}localhost,127.0.0.1,::1"\n' in polaris
        assert "grpc_proxy" not in polaris.replace("(grpc_proxy has no effect on it)", "")
    for case in ("perlmutter", "pbs", "local", "pbs.per-gpu"):
        assert "export http_proxy" not in script_of(case) and "export https_proxy" not in script_of(case)


def test_tls_superlink_flags():
    for case in ("polaris", "polaris.per-gpu"):
        flags = supernode_lines(script_of(case))
        assert "--superlink fl.example.org:443 \\" in flags
        assert '--root-certificates "$HOME/chemfl/certs/ca.crt" \\' in flags  # flwr does not expand ~ there
        assert '--auth-supernode-private-key "$HOME/chemfl/keys/polaris-${index}" \\' in flags
        assert "--insecure \\" not in flags


def test_local_superlink_flags():
    for case in ("local", "local.per-gpu"):
        flags = supernode_lines(script_of(case))
        assert "--insecure \\" in flags
        assert not any(flag.startswith(("--root-certificates", "--auth-supernode-private-key")) for flag in flags)


@pytest.mark.parametrize(
    ("case", "pinning"),
    [
        ("polaris.per-gpu", 'export CUDA_VISIBLE_DEVICES="$gpu"'),
        ("perlmutter.per-gpu", 'export CUDA_VISIBLE_DEVICES="$gpu"'),
        ("aurora.per-gpu", 'export ZE_AFFINITY_MASK="$gpu"'),
        ("pbs.per-gpu", 'export CUDA_VISIBLE_DEVICES="$gpu"'),
    ],
)
def test_pinning_by_variable(case, pinning):
    script = script_of(case)
    assert f"      {pinning}\n" in script
    assert ("ZE_FLAT_DEVICE_HIERARCHY=FLAT" in script) == case.startswith("aurora")


def test_frontier_pins_with_srun_one_task_per_gcd():
    script = script_of("frontier.per-gpu")
    assert "srun --nodes=2 --ntasks-per-node=8 --cpus-per-task=7 --gpus-per-task=1 --gpu-bind=closest" in script
    assert "CUDA_VISIBLE_DEVICES" not in script and "ZE_AFFINITY_MASK" not in script


def test_multi_node_mpiexec_binds_and_passes_the_environment():
    """hpc.md: always give mpiexec a CPU binding and --envall."""
    assert "mpiexec -n 2 --ppn 1 --cpu-bind none --envall \\\n" in script_of("aurora.per-gpu")
    for case in ("polaris", "aurora", "pbs"):
        (line,) = [line for line in script_of(case).splitlines() if line.strip().startswith("mpiexec")]
        assert "--cpu-bind " in line and line.rstrip(" \\").endswith("--envall")


# --- the per-job layout: each site's trainer launch and collective settings ------------------------

TRAINER_LAUNCH = {
    "polaris": "mpiexec -n 8 --ppn 4 --depth=8 --cpu-bind depth --envall",
    "aurora": "mpiexec -n 24 --ppn 12 --pmi=pmix --cpu-bind list:4-7:8-11:12-15:16-19:20-23:24-27:56-59:60-63:"
    "64-67:68-71:72-75:76-79 --envall",
    "frontier": "srun --nodes=2 --ntasks=16 --ntasks-per-node=8 --cpus-per-task=7 --gpus-per-task=1 --gpu-bind=closest",
    "perlmutter": "srun --nodes=1 --ntasks-per-node=4 --gpus-per-node=4 --cpus-per-task=32",
    "pbs": "mpiexec -n 2 --ppn 2 --cpu-bind none --envall",
    "slurm": "srun --nodes=3 --ntasks=12 --ntasks-per-node=4 --gpus-per-node=4",
    "local": "torchrun --standalone --nproc-per-node=2 --no-python",
}
COLLECTIVES = {
    "polaris": [
        'NCCL_NET_GDR_LEVEL="PHB"',
        'NCCL_CROSS_NIC="1"',
        'NCCL_COLLNET_ENABLE="1"',
        'NCCL_NET="AWS Libfabric"',
        'FI_CXI_DISABLE_HOST_REGISTER="1"',
        'FI_MR_CACHE_MONITOR="userfaultfd"',
        'FI_CXI_DEFAULT_CQ_SIZE="131072"',
    ],
    "aurora": [
        'CCL_PROCESS_LAUNCHER="pmix"',
        'CCL_ATL_TRANSPORT="mpi"',
        'CCL_KVS_MODE="mpi"',
        'FI_MR_CACHE_MONITOR="userfaultfd"',
    ],
    "frontier": ['NCCL_SOCKET_IFNAME="hsn0,hsn1,hsn2,hsn3"'],
    "perlmutter": ['NCCL_DEBUG="WARN"'],  # none of NERSC's in hpc.md: only the file's trainer-env
    "pbs": [],
    "slurm": [],
    "local": [],
}


@pytest.mark.parametrize("case", GOLDEN_FACILITIES)
def test_per_job_trainer_launch_and_collectives(case):
    script = script_of(case)
    assert f"\n    {TRAINER_LAUNCH[case]} \\\n" in script
    exports = [line.split("  #")[0] for line in script.splitlines() if line.startswith("export ")]
    collective = [
        line.removeprefix("export ") for line in exports if line.startswith(("export NCCL", "export CCL", "export FI_"))
    ]
    assert collective == COLLECTIVES[case]
    for line in script.splitlines():  # each setting cites its source
        if line.startswith(("export NCCL", "export CCL", "export FI_", "export MIOPEN")):
            assert "  # " in line, line
    backend = {"aurora": "xccl", "pbs": "auto", "slurm": "auto", "local": "auto"}.get(case, "nccl")
    assert f"      --backend {backend} \\\n" in script
    assert ("MASTER_PORT" in script) == (case != "local")


def test_per_job_site_specifics():
    polaris, aurora, frontier = script_of("polaris"), script_of("aurora"), script_of("frontier")
    assert 'export MASTER_ADDR=$(head -n 1 "${PBS_NODEFILE:-/dev/null}")' in polaris
    assert "on_library_path 'libnccl-net*.so'" in polaris and "  unset NCCL_NET\n" in polaris
    assert "PMI_RANK=${PMI_RANK:-${PALS_RANKID:-${PMIX_RANK:-}}} PMI_SIZE=${PMI_SIZE:-8}" in polaris
    assert ".hsn.cm.aurora.alcf.anl.gov" in aurora and "export ZE_FLAT_DEVICE_HIERARCHY=FLAT" in aurora
    assert "ZE_AFFINITY_MASK" not in aurora  # each rank picks its tile from its local rank
    assert "module load rccl-net-plugin ||" in frontier
    assert 'export MIOPEN_USER_DB_PATH="$CHEMFL_RUN_DIR/miopen"' in frontier
    assert 'bash -c \'mkdir -p "$MIOPEN_USER_DB_PATH" "$MIOPEN_CUSTOM_CACHE_DIR"; exec "$@"\'' in frontier
    assert "export MASTER_ADDR=$(hostname -i | cut -d' ' -f1)" in frontier
    assert '"$MIOPEN_USER_DB_PATH"' in script_of("frontier.per-gpu")  # per-gpu SuperNodes train too
    assert "MIOPEN" not in polaris


def test_the_trainer_gets_the_contract_flags():
    script = script_of("polaris")
    command = script[script.index("    chemfl trainer \\") :].split(") < /dev/null")[0]
    assert '--run-config "$HOME/chemfl/recipes/run.toml"' in command
    assert '--data-path "/eagle/MyProject/chemfl/partitions/polaris"' in command
    assert '--socket "$CHEMFL_TRAINER_SOCKET"' in command and '--secret-file "$CHEMFL_TRAINER_SECRET"' in command
    assert '--job-end-time "$CHEMFL_JOB_END_TIME"' in command


def test_local_has_no_scheduler_and_no_pinning():
    for case in ("local", "local.per-gpu"):
        script = script_of(case)
        assert not directive_lines(script) and "srun" not in script and "mpiexec" not in script
        assert "CUDA_VISIBLE_DEVICES" not in script
        assert "curl" not in script  # submit checked the SuperLink from this very machine


def test_local_facilities_on_one_machine_get_distinct_ports():
    for layout, ports in (("per-gpu", (9094, 9096)), ("per-job", (9094, 9095))):
        facilities = {
            name: {**GOLDEN_FACILITIES["local"], "layout": layout}
            | ({"supernodes-per-node": 2, "recipe": None} if layout == "per-gpu" else {})
            for name in ("a", "b")
        }
        facilities = {name: {k: v for k, v in table.items() if v is not None} for name, table in facilities.items()}
        plan = parse_plan({"superlink": dict(LOCAL_SUPERLINK), "facilities": facilities})
        assert f"--port $(( {ports[0]} + gpu ))" in render_script(plan, plan.facilities[0])
        assert f"--port $(( {ports[1]} + gpu ))" in render_script(plan, plan.facilities[1])


@pytest.mark.parametrize(("walltime", "margin"), [("01:00:00", 120), ("00:10:00", 30), ("48:00:00", 120)])
def test_services_stop_before_the_walltime(walltime, margin):
    for case in ("polaris", "polaris.per-gpu"):
        plan = plan_for(case, walltime=walltime, queue="preemptable")
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
        "SLURM_NODEID", "SLURM_LOCALID", "SLURM_PROCID", "https_proxy", "no_proxy", "grpc_proxy",
        "CHEMFL_TIMEOUT", "SITE_SETUP_RAN", "MIOPEN_USER_DB_PATH")
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
echo "srun $nodes x $per_node" >> "$RECORDS/launches"
for ((node = 0; node < nodes; node++)); do
  for ((local = 0; local < per_node; local++)); do
    SLURM_NODEID=$node SLURM_LOCALID=$local SLURM_PROCID=$((node * per_node + local)) \
      SLURM_NTASKS=$((nodes * per_node)) "$@" &
  done
done
wait
""",
    # Runs the command once per rank, numbered as Cray PALS does (no PMI_RANK with --pmi=pmix).
    "mpiexec": """#!/bin/bash
ranks=1 per_node=1 pmix=0
while [[ $1 == -* ]]; do
  case $1 in
    -n) ranks=$2; shift ;;
    --ppn) per_node=$2; shift ;;
    --cpu-bind|--depth) shift ;;
    --pmi=pmix) pmix=1 ;;
  esac
  shift
done
echo "mpiexec $ranks / $per_node" >> "$RECORDS/launches"
for ((rank = 0; rank < ranks; rank++)); do
  if (( pmix )); then
    PALS_NODEID=$((rank / per_node)) PALS_RANKID=$rank PALS_LOCAL_RANKID=$((rank % per_node)) PMIX_RANK=$rank "$@" &
  else
    PALS_NODEID=$((rank / per_node)) PALS_RANKID=$rank PALS_LOCAL_RANKID=$((rank % per_node)) PMI_RANK=$rank \
      PMI_SIZE=$ranks "$@" &
  fi
done
wait
""",
    # Runs the command once per process, numbered as torchrun does; the first to fail ends them all.
    "torchrun": """#!/bin/bash
n=1
while [[ $1 == --* ]]; do
  case $1 in --nproc-per-node=*) n=${1#*=} ;; esac
  shift
done
echo "torchrun $n" >> "$RECORDS/launches"
pids=()
for ((rank = 0; rank < n; rank++)); do
  RANK=$rank LOCAL_RANK=$rank WORLD_SIZE=$n MASTER_ADDR=127.0.0.1 MASTER_PORT=29400 "$@" &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null' TERM INT
status=0
wait -n || status=$?
kill "${pids[@]}" 2>/dev/null
wait
exit "$status"
""",
    # The connectivity probe: recorded; fails with $CURL_EXIT when set.
    "curl": """#!/bin/bash
echo "$*" >> "$RECORDS/curl"
if [[ -n ${CURL_EXIT:-} ]]; then
  echo "curl: (56) CONNECT tunnel failed, response 403" >&2
  exit "$CURL_EXIT"
fi
""",
    "module": """#!/bin/bash
exit 0
""",
}
# A stand-in `chemfl trainer`: records each rank; rank 0 prints the ready line after TRAINER_LOAD s (never
# with TRAINER_NEVER_READY); TRAINER_EXIT ends it at once with that status; otherwise it waits to be stopped.
FAKE_CHEMFL = f"""#!{sys.executable}
import json, os, signal, sys, time
assert sys.argv[1] == "trainer", sys.argv
records = os.environ["RECORDS"]
rank = next(os.environ[key] for key in ("RANK", "PMI_RANK", "SLURM_PROCID") if os.environ.get(key))
keep = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "PALS_LOCAL_RANKID", "SLURM_PROCID",
        "SLURM_NTASKS", "SLURM_LOCALID", "MASTER_ADDR", "MASTER_PORT", "NCCL_NET", "NCCL_SOCKET_IFNAME",
        "CCL_PROCESS_LAUNCHER", "ZE_FLAT_DEVICE_HIERARCHY", "MIOPEN_USER_DB_PATH", "SITE_SETUP_RAN")
record = {{"argv": sys.argv[1:], "env": {{key: os.environ.get(key) for key in keep}}, "pid": os.getpid(),
          "started": time.time(), "miopen_dir": os.path.isdir(os.environ.get("MIOPEN_USER_DB_PATH", "/nowhere"))}}
with open(os.path.join(records, f"trainer-{{rank}}.json"), "w") as stream:
    json.dump(record, stream)

def stopped(signum, frame):
    with open(os.path.join(records, f"trainer-{{rank}}.stopped"), "w") as stream:
        stream.write(str(time.time()))
    sys.exit(0)

signal.signal(signal.SIGTERM, stopped)
if os.environ.get("TRAINER_EXIT"):
    sys.exit(int(os.environ["TRAINER_EXIT"]))
time.sleep(float(os.environ.get("TRAINER_LOAD", "0")))
if rank == "0" and not os.environ.get("TRAINER_NEVER_READY"):
    with open(os.path.join(records, "trainer.ready"), "w") as stream:
        stream.write(str(time.time()))
    print("trainer ready in 0.3 s", flush=True)
while True:
    time.sleep(1)
"""


def install_stand_ins(tmp_path: Path, *, fake_timeout: bool = True, **extra: str) -> dict[str, str]:
    """The stand-ins (and `extra` ones, name -> text) first on PATH, a home with the venv's activate and
    the CA; returns the environment to run a job script with."""
    bin_dir, records, home = tmp_path / "bin", tmp_path / "records", tmp_path / "home"
    for folder in (bin_dir, records, home, tmp_path / "tmp"):
        folder.mkdir(exist_ok=True)
    stand_ins = {**STAND_INS, "chemfl": FAKE_CHEMFL, **extra}
    if not fake_timeout:
        del stand_ins["timeout"]
    for name, text in stand_ins.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (home / "chemfl" / ".venv" / "bin").mkdir(parents=True, exist_ok=True)
    (home / "chemfl" / ".venv" / "bin" / "activate").write_text("export SITE_SETUP_RAN=1\n")
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(home),
        "TMPDIR": str(tmp_path / "tmp"),
        "RECORDS": str(records),
        "PSCRATCH": "/pscratch/u",
        "no_proxy": "site.example.org",
    }


def run_with_stand_ins(
    script: str, tmp_path: Path, *, expect: int = 0, fake_timeout: bool = True, **environment: str
) -> tuple[list[dict], str]:
    """Run `script` with bash and the stand-ins first on PATH: what each SuperNode got, and the job's output."""
    env = {**install_stand_ins(tmp_path, fake_timeout=fake_timeout), **environment}
    (tmp_path / "job.sh").write_text(script)
    done = subprocess.run(
        ["bash", str(tmp_path / "job.sh")], env=env, capture_output=True, text=True, timeout=90, cwd=tmp_path
    )
    assert done.returncode == expect, done.stdout + done.stderr
    records = [json.loads(path.read_text()) for path in (tmp_path / "records").glob("*.json")]
    return [record for record in records if "pid" not in record], done.stdout + done.stderr


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize("name", ["aurora", "frontier", "slurm", "perlmutter", "local"])
def test_every_supernode_starts_once_with_its_own_index_port_and_home(name, tmp_path):
    plan = plan_for(f"{name}.per-gpu")
    facility = only(plan)
    records, output = run_with_stand_ins(render_script(plan, facility), tmp_path)
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
        assert flag(record["argv"], "--max-wait-time") == "600"
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
        assert all(record["env"]["https_proxy"] == "http://proxy.alcf.anl.gov:3128" for record in records)
        assert all(record["env"]["no_proxy"] == "site.example.org,localhost,127.0.0.1,::1" for record in records)
        assert all(record["env"]["grpc_proxy"] is None for record in records)
    if name == "frontier":
        assert all(record["env"]["MIOPEN_USER_DB_PATH"].endswith("/miopen") for record in records)
    probed = (tmp_path / "records" / "curl").read_text().splitlines() if name != "local" else []
    assert len(probed) == (0 if name == "local" else 1)
    if probed:
        assert probed[0].endswith("--cacert " + f"{tmp_path}/home/chemfl/certs/ca.crt https://fl.example.org:443/")
        assert "SuperLink fl.example.org:443 reachable from" in output


def test_no_supernode_starts_when_the_job_is_about_to_end(tmp_path):
    plan = plan_for("slurm.per-gpu", nodes=1)
    soon = str(int(time.time()) + stop_margin_seconds(only(plan).walltime_seconds) - 5)
    records, output = run_with_stand_ins(render_script(plan, only(plan)), tmp_path, SLURM_JOB_END_TIME=soon)
    assert records == []
    assert "SuperNode 0 not started: the job ends in under 120 s" in output


@pytest.mark.parametrize("case", ["slurm", "slurm.per-gpu", "polaris"])
def test_a_blocked_proxy_fails_the_job_before_anything_starts(case, tmp_path):
    plan = plan_for(case, nodes=1) if case.startswith("slurm") else plan_for(case)
    records, output = run_with_stand_ins(
        render_script(plan, only(plan)), tmp_path, expect=1, CURL_EXIT="56", CHEMFL_PROBE_PAUSE="0"
    )
    assert records == [] and not list((tmp_path / "records").glob("trainer-*"))
    assert len((tmp_path / "records" / "curl").read_text().splitlines()) == 3  # CHEMFL_PROBE_ATTEMPTS
    assert "CONNECT tunnel failed" in output
    assert "is not reachable from compute node" in output and "job stopped" in output


# --- the per-job layout with stand-ins: every site's launcher, the trainer's ranks, the SuperNode ----


@pytest.mark.parametrize("case", GOLDEN_FACILITIES)
def test_per_job_starts_the_trainer_on_every_gpu_then_one_supernode(case, tmp_path):
    plan = plan_for(case, nodes=1) if case in ("slurm",) else plan_for(case)
    facility = only(plan)
    records, output = run_with_stand_ins(render_script(plan, facility), tmp_path, fake_timeout=False)
    ranks = facility.nodes * facility.profile.gpus_per_node
    trainers = {path.stem: json.loads(path.read_text()) for path in (tmp_path / "records").glob("trainer-*.json")}
    assert sorted(trainers) == sorted(f"trainer-{rank}" for rank in range(ranks))
    for name, trainer in trainers.items():
        argv = trainer["argv"]
        assert argv[0] == "trainer"
        assert flag(argv, "--socket").endswith("/trainer.sock")
        assert flag(argv, "--secret-file").endswith("/trainer.secret")
        assert flag(argv, "--backend") == facility.trainer_backend
        assert flag(argv, "--data-path") == facility.data_path.replace("$PSCRATCH", "/pscratch/u")
        assert int(flag(argv, "--job-end-time")) > time.time()
        env = trainer["env"]
        if facility.profile.scheduler == "pbs":  # the PALS ranks always carry PMI_RANK / PMI_SIZE for the trainer
            assert (env["PMI_RANK"], env["PMI_SIZE"]) == (name.removeprefix("trainer-"), str(ranks))
        if case != "local":
            assert env["SITE_SETUP_RAN"] == "1" and env["MASTER_PORT"] == "29500"
    (supernode,) = records
    config = parse_config_args([flag(supernode["argv"], "--node-config")])
    assert config["trainer"] == f"unix:{flag(trainers['trainer-0']['argv'], '--socket')}"
    assert config["trainer-secret-file"] == flag(trainers["trainer-0"]["argv"], "--secret-file")
    assert "data-slice" not in config
    assert "chemfl: trainer ready in 0.3 s" in output
    assert "the SuperNode ended (on schedule, or with nothing left to do); stopping the trainer" in output
    assert all((tmp_path / "records" / f"trainer-{rank}.stopped").exists() for rank in range(ranks))
    if case == "polaris":
        assert trainers["trainer-0"]["env"]["NCCL_NET"] is None  # no aws-ofi-nccl plugin here: sockets
        assert "no libnccl-net*.so on LD_LIBRARY_PATH" in output
        assert trainers["trainer-0"]["env"]["MASTER_ADDR"]
    if case == "aurora":
        assert trainers["trainer-13"]["env"]["CCL_PROCESS_LAUNCHER"] == "pmix"
        assert trainers["trainer-0"]["env"]["ZE_FLAT_DEVICE_HIERARCHY"] == "FLAT"
    if case == "frontier":
        assert all(trainer["miopen_dir"] for trainer in trainers.values())
        assert trainers["trainer-0"]["env"]["NCCL_SOCKET_IFNAME"] == "hsn0,hsn1,hsn2,hsn3"
    launches = (tmp_path / "records" / "launches").read_text().split()
    assert launches[0] == TRAINER_LAUNCH[case].split()[0]
