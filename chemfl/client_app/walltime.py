"""How long this SuperNode's batch job still runs, so strategies can size work to fit it.

Sources, first found wins: the node config's `job-end-time` (epoch seconds, set by the
launcher's scripts), `CHEMFL_JOB_END_TIME`, Slurm's `SLURM_JOB_END_TIME`, and PBS
(`qstat -f $PBS_JOBID`: walltime limit minus walltime used). None outside a batch job.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping


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
        from chemfl.launcher.schedulers import pbs_remaining_walltime

        return pbs_remaining_walltime(environ["PBS_JOBID"])
    return None
