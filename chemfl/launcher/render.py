"""Batch scripts that start one Flower SuperNode per GPU (tile, GCD) of a facility's job.

The scripts are meant to be read and edited by the people who submit them, so the logic that
decides what goes in them lives here and the layout lives in Jinja2 templates shipped with the
package (chemfl/launcher/templates): body.sh.j2 is the script without scheduler directives (what a
Globus Compute ShellFunction runs inside an endpoint-managed job), and pbs.sh.j2, slurm.sh.j2 and
local.sh.j2 add each scheduler's directives to it.
"""

from __future__ import annotations

import posixpath

import jinja2

from chemfl.launcher.facilities import Facility, LaunchPlan, format_walltime, supernode_count, supernode_key_name

FIRST_RUNTIME_PORT = 9094  # flower-supernode's default --port; the i-th SuperNode on a host takes 9094 + i
MAX_STOP_MARGIN_SECONDS = 120  # SuperNodes get SIGTERM this long before the job's end (less for short jobs)
PINNING_VARIABLES = {"cuda": "CUDA_VISIBLE_DEVICES", "ze": "ZE_AFFINITY_MASK"}  # srun and none set no variable


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
    return {
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
