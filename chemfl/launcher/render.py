"""Batch scripts that start a facility's job: one Flower SuperNode and one `chemfl trainer` across the
job's GPUs (layout per-job), or one SuperNode per GPU, tile or GCD (layout per-gpu).

The scripts are meant to be read and edited by the people who submit them, so the logic that
decides what goes in them lives here and the layout lives in Jinja2 templates shipped with the
package (chemfl/launcher/templates): body.sh.j2 is the script without scheduler directives (what a
Globus Compute ShellFunction runs inside an endpoint-managed job), and pbs.sh.j2, slurm.sh.j2 and
local.sh.j2 add each scheduler's directives to it.

Every service (a SuperNode, the trainer) runs under `timeout` without --foreground, which puts it in
its own process group: the walltime stop and the script's own stop reach the SuperNode's children
(SuperExec, ClientApps) and every launcher rank, not only the first process (hpc.md: `timeout
--foreground CMD` does not time out CMD's children). The groups stay in the job's session, which is
what PBS kills; Slurm kills through cgroups.
"""

from __future__ import annotations

import posixpath

import jinja2

from chemfl.launcher.facilities import (
    Facility,
    LaunchPlan,
    format_walltime,
    supernode_count,
    supernode_key_name,
    trainer_ranks_per_node,
)

FIRST_RUNTIME_PORT = 9094  # flower-supernode's default --port; the i-th SuperNode on a host takes 9094 + i
MAX_STOP_MARGIN_SECONDS = 120  # SuperNodes get SIGTERM this long before the job's end (less for short jobs)
PINNING_VARIABLES = {"cuda": "CUDA_VISIBLE_DEVICES", "ze": "ZE_AFFINITY_MASK"}  # srun and none set no variable
# flower-supernode retries a lost SuperLink forever by default (flwr 1.42: --max-retries and --max-wait-time
# are None): a blocked proxy would burn the allocation silently. Each Fleet API call gives up after this long.
CONNECT_WAIT_SECONDS = 600
MASTER_PORT = 29500  # hpc.md (NERSC): MASTER_PORT=29500; the rendezvous port of multi-node trainers


def at_facility(path: str) -> str:
    """A path for the facility's shell, to sit inside double quotes: a leading ~ becomes $HOME, since
    quotes stop the shell's ~ expansion and flower-supernode does not expand ~ in --root-certificates."""
    if path == "~" or path.startswith("~/"):
        return "$HOME" + path[1:]
    return path


def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("chemfl.launcher", "templates"),
        undefined=jinja2.StrictUndefined,  # a misspelt variable fails the render instead of vanishing
        autoescape=False,  # shell, not HTML
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters["at_facility"] = at_facility
    return environment


TEMPLATES = _environment()


def render_script(plan: LaunchPlan, facility: Facility) -> str:
    """The full batch script: directives for the facility's scheduler, then the body."""
    return TEMPLATES.get_template(f"{facility.profile.scheduler}.sh.j2").render(_context(plan, facility))


def render_body(plan: LaunchPlan, facility: Facility) -> str:
    """The script without scheduler directives, for a job someone else (a Globus endpoint) requested."""
    return TEMPLATES.get_template("body.sh.j2").render(_context(plan, facility))


def stop_margin_seconds(walltime_seconds: int) -> int:
    """How long before the job's end SuperNodes are stopped: 120 s, or 5% of a walltime under 40 min,
    so a short local test still gets most of its time."""
    return min(MAX_STOP_MARGIN_SECONDS, walltime_seconds // 20)


def first_runtime_port(plan: LaunchPlan, facility: Facility) -> int:
    """The runtime port of the facility's first SuperNode on a host. Batch jobs own their nodes, so they
    all start at 9094; local facilities share this machine, so each starts after the ones before it."""
    if facility.profile.scheduler != "local":
        return FIRST_RUNTIME_PORT
    earlier = plan.facilities[: plan.facilities.index(facility)]
    return FIRST_RUNTIME_PORT + sum(supernode_count(other) for other in earlier if other.profile.scheduler == "local")


def queue_directive(facility: Facility) -> str:
    """The option naming the queue: PBS `-q Q`; Slurm `--partition=Q` or `--qos=Q` as the profile says."""
    profile = facility.profile
    if profile.scheduler == "pbs":
        return f"-q {facility.queue}"
    return f"{profile.queue_flag_overrides.get(facility.queue, profile.queue_flag)}={facility.queue}"


def trainer_launch(facility: Facility) -> str:
    """The launcher that starts one `chemfl trainer` rank per GPU (tile, GCD) on every node of the job.

    Site profiles carry their documented line (profiles.py, with sources). Generic profiles follow the
    closest site: PBS uses Cray PALS mpiexec as on Polaris, with `--cpu-bind none` since a generic
    node's core count is unknown (hpc.md: always pass a CPU binding and --envall); Slurm uses srun as
    on Frontier (gpu-pinning srun) or Perlmutter (cuda, ze); local uses torchrun --standalone.
    """
    profile = facility.profile
    per_node = trainer_ranks_per_node(facility)
    numbers = {"nodes": facility.nodes, "ranks": facility.nodes * per_node, "per_node": per_node}
    if profile.trainer_launch:
        return profile.trainer_launch.format(**numbers)
    if profile.scheduler == "pbs":
        return "mpiexec -n {ranks} --ppn {per_node} --cpu-bind none --envall".format(**numbers)
    if profile.scheduler == "slurm":
        line = "srun --nodes={nodes} --ntasks={ranks} --ntasks-per-node={per_node}".format(**numbers)
        if profile.gpu_pinning == "srun":
            return line + " --gpus-per-task=1 --gpu-bind=closest"
        if profile.gpu_pinning in ("cuda", "ze"):
            return line + f" --gpus-per-node={per_node}"
        return line
    return f"torchrun --standalone --nproc-per-node={per_node} --no-python"


def trainer_prelude(facility: Facility) -> str:
    """Shell run by every trainer rank before `chemfl trainer` (inside single quotes; "" = none): the
    node-local folders the profile wants on each node, and on Cray PALS the PMI_RANK / PMI_SIZE the
    trainer reads (PALS always sets PALS_RANKID; with --pmi=pmix, PMIX_RANK rather than PMI_RANK)."""
    profile = facility.profile
    steps = []
    if profile.node_local_dirs:
        steps.append("mkdir -p " + " ".join(f'"${setting.name}"' for setting in profile.node_local_dirs))
    if profile.rank_from_pals:
        ranks = facility.nodes * trainer_ranks_per_node(facility)
        steps.append(
            "export PMI_RANK=${PMI_RANK:-${PALS_RANKID:-${PMIX_RANK:-}}} PMI_SIZE=${PMI_SIZE:-" + str(ranks) + "}"
        )
    return "; ".join(steps)


def trainer_launch_source(facility: Facility) -> str:
    profile = facility.profile
    if profile.trainer_launch_source:
        return profile.trainer_launch_source
    return {
        "pbs": "generic PBS: Cray PALS mpiexec as on Polaris, unbound (the node's cores are unknown)",
        "slurm": "generic Slurm: srun as on Frontier (gpu-pinning srun) or Perlmutter",
        "local": "no scheduler: torchrun --standalone, one process per gpus-per-node (CPU/gloo on a laptop)",
    }[profile.scheduler]


def probe_url(plan: LaunchPlan) -> str:
    """What the job's connectivity probe asks for: the SuperLink's HTTPS (or, insecure, HTTP) root."""
    return f"{'http' if plan.superlink.insecure else 'https'}://{plan.superlink.address}/"  # host:port or [v6]:port


def launch_style(facility: Facility) -> str:
    """How the SuperNodes are started: "tasks" (one srun task per GPU, srun pins it), "node" (a loop on
    this node), "mpiexec" or "srun" (the same loop on every node of a multi-node job)."""
    if facility.profile.gpu_pinning == "srun":
        return "tasks"
    if facility.nodes == 1:
        return "node"
    return "mpiexec" if facility.profile.scheduler == "pbs" else "srun"


def _context(plan: LaunchPlan, facility: Facility) -> dict[str, object]:
    keys_dir = plan.superlink.keys_dir
    profile = facility.profile
    per_job = facility.layout == "per-job"
    return {
        "per_job": per_job,
        "trainer_launch": trainer_launch(facility) if per_job else "",
        "trainer_launch_source": trainer_launch_source(facility) if per_job else "",
        "trainer_ranks": facility.nodes * trainer_ranks_per_node(facility),
        "multi_node_trainer": per_job and profile.scheduler != "local",
        "trainer_prelude": trainer_prelude(facility) if per_job else "",
        "master_port": MASTER_PORT,
        "connect_wait": CONNECT_WAIT_SECONDS,
        # The local profile runs on the machine `submit` checked the SuperLink from: no probe there.
        "probe_url": probe_url(plan) if profile.scheduler != "local" else "",
        "directive_lines": profile.directives + (profile.trainer_directives if per_job else ()) + facility.directives,
        "facility": facility,
        "profile": facility.profile,
        "superlink": plan.superlink,
        "walltime": format_walltime(facility.walltime_seconds),
        "stop_margin": stop_margin_seconds(facility.walltime_seconds),
        "total_supernodes": supernode_count(facility),
        "first_port": first_runtime_port(plan, facility),
        "queue_directive": queue_directive(facility) if facility.queue else "",
        "launch": launch_style(facility),
        "pin_variable": PINNING_VARIABLES.get(facility.profile.gpu_pinning, ""),
        "key_path": posixpath.join(keys_dir, supernode_key_name(facility.name, "${index}")) if keys_dir else "",
    }
