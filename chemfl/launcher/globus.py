"""The Globus Compute backend: run a facility's job body as a ShellFunction on its endpoint.

The endpoint's own provider (PBSProProvider / SlurmProvider) queues the batch job, so from here a
task is "running" from submission until its future resolves. A Globus Executor logs in and calls
the service when constructed, so one is built per facility only when that facility first submits.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from chemfl.errors import ChemFLError
from chemfl.launcher.schedulers import JobState, JobTarget

ExecutorFactory = Callable[[JobTarget], concurrent.futures.Executor]

CANCEL_NOTE = (
    "Globus Compute tasks cannot be cancelled once registered: the task runs until its body exits "
    "or its walltime passes"
)
STDERR_TAIL_LINES = 5


def globus_compute_executor(target: JobTarget) -> concurrent.futures.Executor:
    """A globus_compute_sdk.Executor for `target`'s endpoint (logs in: call it only when needed)."""
    from globus_compute_sdk import Executor

    return Executor(endpoint_id=target.globus_endpoint, user_endpoint_config=target.globus_config or None)


def escape_braces(body: str) -> str:
    """ShellFunction fills `{name}` from submit kwargs via str.format; keep the body's braces literal."""
    return body.replace("{", "{{").replace("}", "}}")


def shell_function_name(facility: str) -> str:
    """The name the task shows under in the Globus web app (must be a Python identifier)."""
    return "chemfl_" + re.sub(r"\W", "_", facility)


def describe_outcome(future: concurrent.futures.Future) -> dict:
    """A finished ShellFunction future -> {"exit_code", "stderr_tail"} or {"error"}."""
    if future.cancelled():
        return {"error": "cancelled before it was sent"}
    error = future.exception()
    if error is not None:
        return {"error": f"{type(error).__name__}: {error}"}
    result = future.result()
    stderr_tail = "\n".join(result["stderr"].rstrip().splitlines()[-STDERR_TAIL_LINES:])
    return {"exit_code": result["returncode"], "stderr_tail": stderr_tail}


@dataclass
class GlobusBackend:
    """A `Backend` submitting each target's body as a ShellFunction to the target's endpoint."""

    executor_factory: ExecutorFactory = globus_compute_executor
    executors: dict[str, concurrent.futures.Executor] = field(default_factory=dict)
    functions: dict[str, Callable] = field(default_factory=dict)
    futures: dict[str, concurrent.futures.Future] = field(default_factory=dict)
    local_ids: itertools.count = field(default_factory=itertools.count)

    def check(self, target: JobTarget) -> None:
        if not target.globus_endpoint:
            raise ChemFLError(f"{target.facility}: backend = globus needs a globus endpoint id")

    def submit(self, target: JobTarget, after: str | None = None) -> str:
        if after:
            raise ChemFLError(
                f"{target.facility}: backend = globus cannot queue a job ahead: the endpoint submits the batch "
                'jobs itself, out of sight; remove queue-ahead or use backend = "cli"'
            )
        from globus_compute_sdk import ShellFunction  # the SDK takes ~0.4 s to import: only globus launches pay

        if target.facility not in self.executors:
            self.executors[target.facility] = self.executor_factory(target)
            # One function object per facility: the Executor registers each new object with the service.
            self.functions[target.facility] = ShellFunction(
                escape_braces(target.body),
                walltime=target.walltime_seconds,
                name=shell_function_name(target.facility),
                return_dict=True,
            )
        future = self.executors[target.facility].submit(self.functions[target.facility])
        # A Globus Executor batches submissions, so the task id usually arrives later.
        job_id = getattr(future, "task_id", None) or f"globus-{target.facility}-{next(self.local_ids)}"
        self.futures[job_id] = future
        return job_id

    def state(self, job_id: str) -> JobState:
        return "ended" if self.future(job_id).done() else "running"

    def end_details(self, job_id: str) -> dict:
        future = self.future(job_id)
        details = describe_outcome(future)
        task_id = getattr(future, "task_id", None)
        if task_id and task_id != job_id:
            details["task_id"] = task_id
        return details

    def cancel(self, job_id: str) -> str:
        future = self.futures.get(job_id)
        if future is not None:
            future.cancel()  # succeeds only while the Executor has not yet sent the task
        return CANCEL_NOTE

    def close(self) -> None:
        for executor in self.executors.values():
            executor.shutdown(wait=False)
        self.executors.clear()
        self.functions.clear()

    def future(self, job_id: str) -> concurrent.futures.Future:
        if job_id not in self.futures:
            raise ChemFLError(
                f"Globus task {job_id} was not submitted by this process: only the watcher that submitted "
                "a Globus task can follow it"
            )
        return self.futures[job_id]
