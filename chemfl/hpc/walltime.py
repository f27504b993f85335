"""How long this SuperNode's batch job still runs, so strategies can size work to fit it.

Sources, first found wins: the node config's `job-end-time` (epoch seconds, set by the
launcher's scripts), `CHEMFL_JOB_END_TIME`, Slurm's `SLURM_JOB_END_TIME`, and PBS
(`qstat -f $PBS_JOBID`: walltime limit minus walltime used). None outside a batch job.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

from chemfl.errors import ChemFLError
from chemfl.hpc.commands import run_command


def remaining_walltime(
    node_config: Mapping, environ: Mapping[str, str] = os.environ, now: float | None = None
) -> float | None:
    now = time.time() if now is None else now
    for end in (node_config.get("job-end-time"), environ.get("CHEMFL_JOB_END_TIME"), environ.get("SLURM_JOB_END_TIME")):
        try:
            if end not in (None, ""):
                return max(0.0, float(end) - now)
        except (TypeError, ValueError):
            continue  # a malformed value is no information; try the next source
    if environ.get("PBS_JOBID"):
        return pbs_remaining_walltime(environ["PBS_JOBID"])
    return None


def parse_pbs_attributes(qstat_f: str) -> dict[str, str]:
    """`qstat -f` text -> {attribute: value}; PBS wraps long values onto lines starting with a tab."""
    attributes: dict[str, str] = {}
    last_key = ""
    for line in qstat_f.splitlines():
        if line.startswith("\t") and last_key:
            attributes[last_key] += line.strip()
            continue
        key, equals, value = line.partition(" = ")
        if equals:
            last_key = key.strip()
            attributes[last_key] = value.strip()
    return attributes


def parse_pbs_duration(text: str) -> float:
    """PBS walltime "[[HH:]MM:]SS" (hours may exceed 24) -> seconds."""
    seconds = 0.0
    for part in text.strip().split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def parse_pbs_remaining_walltime(qstat_f: str) -> float | None:
    """Resource_List.walltime minus resources_used.walltime from `qstat -f` text (None: no limit shown).

    PBS refreshes resources_used only every few minutes, so this errs on the side of more time left.
    """
    attributes = parse_pbs_attributes(qstat_f)
    limit = attributes.get("Resource_List.walltime")
    if limit is None:
        return None
    used = parse_pbs_duration(attributes.get("resources_used.walltime", "0"))
    return max(0.0, parse_pbs_duration(limit) - used)


def pbs_remaining_walltime(job_id: str) -> float | None:
    """Seconds left to PBS job `job_id` (e.g. $PBS_JOBID from inside the job); None when qstat cannot say."""
    try:
        result = run_command(["qstat", "-f", job_id])
    except ChemFLError:
        return None
    if result.returncode != 0:
        return None
    return parse_pbs_remaining_walltime(result.stdout)
