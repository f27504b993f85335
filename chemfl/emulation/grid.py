"""A Grid in virtual time: real SuperNodes train for real, the campaign decides when.

`EmulatedGrid` wraps Flower's Grid for the asynchronous loop (`get_node_ids`, `push_messages`,
`pull_messages`, and a `sleep` / `clock` pair the loop is given). Every facility has one
SuperNode, which is online only while that facility's emulated batch job runs. When a task is
pushed its virtual completion time is already known (job start-up once per job, per-task overhead,
steps x seconds per step, adapter transfer both ways):
- if it ends after the job's walltime, it is never sent: at the walltime end the loop receives an
  error reply (the work is lost), exactly as a killed SuperNode would produce;
- otherwise it is sent to the real SuperNode and its completion goes into a priority queue.
Events (completions, losses, job ends and starts) are released strictly in virtual-time order:
a completion waits for its real reply, however late the laptop delivers it. Replies carry the
virtual training seconds and the job's remaining walltime, as the launcher's SuperNodes report.
A strategy that aggregates on a clock (a FedCompass group's deadline, a FedQueue round's end)
sets `alarm` to its `next_due`: the clock then stops at that time, before any later event.

Jobs: without queue-ahead a facility's next job is submitted when its current one ends (the
launcher resubmits at once), so the facility is offline for the whole queue wait. With
`emulation.queue-ahead` (the launcher's `queue-ahead = true`: submitted with an afterany
dependency) it is submitted when the current one starts and waits in the queue meanwhile; it
starts at max(current end, its submission + its wait), so one facility never runs two jobs at once.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from chemfl import protocol
from chemfl.emulation.campaign import CampaignSpec
from chemfl.errors import ChemFLError
from chemfl.protocol import JobLine, NodeInfo, RunLine, Task, TrainReport, task_local_steps
from chemfl.server_app.strategies import RunHooks
from chemfl.server_app.strategy_spec import StrategySpec

NODE_UNAVAILABLE = 5  # flwr.common.constant.ErrorCode.NODE_UNAVAILABLE: what a vanished SuperNode produces

# Order of simultaneous events: a task finishing exactly at the walltime end still counts.
COMPLETION, LOSS, JOB_END, JOB_START = range(4)


@dataclass
class Job:
    index: int
    start: float
    end: float = 0.0
    running: bool = False
    ended: bool = False
    tasks: int = 0  # tasks started in this job (the first pays the start-up cost)


@dataclass
class VirtualTask:
    node_id: int  # virtual
    facility: str
    message_id: str
    real_message_id: str | None  # None: never sent, lost at the walltime end
    steps: int


@dataclass
class EmulatedReply:
    """What the loop reads from a reply: metadata, content or error."""

    metadata: SimpleNamespace
    content: RecordDict | None = None
    error: SimpleNamespace | None = None

    def has_error(self) -> bool:
        return self.error is not None


def discover_facilities(grid: Grid, expected: int, timeout: float = 120.0, poll: float = 0.2) -> dict[int, str]:
    """{real node id: facility} by asking each SuperNode (the ClientApp's query handler)."""
    deadline = time.monotonic() + timeout
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < expected and time.monotonic() < deadline:
        time.sleep(poll)
        node_ids = list(grid.get_node_ids())
    if len(node_ids) < expected:
        raise ChemFLError(
            f"virtual-time emulation needs one SuperNode per facility ({expected}); only "
            f"{len(node_ids)} connected in {timeout:.0f} s: simulate num-supernodes = {expected} "
            "(chemfl simulate does by default)"
        )
    replies = grid.send_and_receive(
        [Message(RecordDict(), dst_node_id=node, message_type=protocol.QUERY) for node in node_ids], timeout=timeout
    )
    facility_of = {}
    for reply in replies:
        if reply.has_error():
            raise ChemFLError(f"SuperNode {reply.metadata.src_node_id} did not say its facility: {reply.error.reason}")
        facility_of[reply.metadata.src_node_id] = NodeInfo.from_record(reply.content[protocol.NODE]).facility
    return facility_of


@dataclass
class EmulatedGrid:
    grid: Grid
    campaign: CampaignSpec
    real_node_of: dict[str, int]  # facility -> real SuperNode id
    default_steps: int
    record: Callable[[dict], None]  # one metrics.jsonl line
    poll_seconds: float = 0.05
    alarm: Callable[[], float | None] | None = None  # the strategy's next deadline (rules' next_due)
    now: float = 0.0
    jobs: dict[str, Job] = field(default_factory=dict)  # each facility's current job (queued, running or just ended)
    queued_ahead: dict[str, Job] = field(default_factory=dict)  # queue-ahead: the job waiting behind the current one
    in_flight: dict[str, VirtualTask] = field(default_factory=dict)  # by message id
    arrived: dict[str, Message] = field(default_factory=dict)  # real replies waiting for their turn
    _events: list = field(default_factory=list)
    _seq: itertools.count = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        missing = [f.name for f in self.campaign.facilities if f.name not in self.real_node_of]
        if missing:
            raise ChemFLError(f"no SuperNode serves facility {', '.join(missing)}")
        for facility in self.campaign.facilities:
            self.jobs[facility.name] = self._queue_job(facility.name, 0, 0.0)

    # --- what the loop calls -------------------------------------------------------------------

    def node_id(self, facility: str) -> int:
        """Stable virtual node ids 1..N in facility order (real ids change from run to run)."""
        return 1 + [f.name for f in self.campaign.facilities].index(facility)

    def facility_of(self, node_id: int) -> str:
        return self.campaign.facilities[node_id - 1].name

    def clock(self) -> float:
        return self.now

    def get_node_ids(self) -> list[int]:
        # A job at its walltime end is gone, even before its end event is processed.
        return [self.node_id(name) for name, job in self.jobs.items() if job.running and job.end > self.now]

    def push_messages(self, messages: list[Message]) -> list[str]:
        return [self._push(message) for message in messages]

    def pull_messages(self, message_ids: list[str]) -> list[EmulatedReply]:
        """At most one reply: the next event, if it is a delivered completion or a loss."""
        self._collect_real_replies()
        if not self._events or self._events[0][1] not in (COMPLETION, LOSS) or self._waiting_for_real_reply():
            return []
        if self._wake_up() is not None:  # the strategy's deadline comes first
            return []
        return [self._step()]

    def sleep(self, seconds: float) -> None:
        """The loop found nothing to do: move the clock to the strategy's deadline when it comes
        first; wait for the laptop when the next event is a completion not yet delivered; move the
        clock to the next job start or end otherwise (one event, so the loop can dispatch at that
        very time)."""
        del seconds  # virtual time does not pass by waiting
        wake_up = self._wake_up()
        if wake_up is not None:
            self.now = wake_up
        elif self._waiting_for_real_reply():
            time.sleep(self.poll_seconds)
        elif self._events and self._events[0][1] in (JOB_START, JOB_END):
            self._step()

    def finish(self) -> None:
        """Close the books: running jobs end now (for node-hour accounting), queued ones too."""
        for name, job in self.jobs.items():
            if not job.ended:
                reason = "campaign end" if job.running else "campaign end (still queued)"
                self._record_job(name, job.index, "ended", reason)
            if name in self.queued_ahead:
                self._record_job(name, self.queued_ahead[name].index, "ended", "campaign end (still queued)")

    # --- tasks ---------------------------------------------------------------------------------

    def _push(self, message: Message) -> str:
        node_id = message.metadata.dst_node_id
        facility = self.facility_of(node_id)
        job = self.jobs[facility]
        if not job.running:
            raise ChemFLError(f"dispatched to {facility}, whose emulated batch job is not running")
        model = self.campaign.facility(facility)
        task = Task.from_config(message.content[protocol.CONFIG])
        steps = task_local_steps(task.local_steps, self.default_steps)
        adapter_bytes = message.content[protocol.ARRAYS].count_bytes()
        duration = (
            (model.startup_seconds if job.tasks == 0 else 0.0)
            + self.campaign.task_overhead_seconds
            + steps * model.seconds_per_step
            + self.campaign.transfer_seconds(adapter_bytes)
        )
        job.tasks += 1
        done = self.now + duration
        message_id = f"virtual-{next(self._seq)}"
        if done <= job.end:
            message.metadata.dst_node_id = self.real_node_of[facility]
            [real_id] = list(self.grid.push_messages([message]))
            self.in_flight[message_id] = VirtualTask(node_id, facility, message_id, real_id, steps)
            self._schedule(done, COMPLETION, message_id)
        else:  # cannot finish before the walltime: lost when the job ends, so not trained at all
            self.in_flight[message_id] = VirtualTask(node_id, facility, message_id, None, steps)
            self._schedule(job.end, LOSS, message_id)
        return message_id

    def _collect_real_replies(self) -> None:
        pending = {
            t.real_message_id: t.message_id
            for t in self.in_flight.values()
            if t.real_message_id is not None and t.message_id not in self.arrived
        }
        if pending:
            for reply in self.grid.pull_messages(list(pending)):
                self.arrived[pending[reply.metadata.reply_to_message_id]] = reply

    def _wake_up(self) -> float | None:
        """The strategy's next deadline, when it falls after now and before the next event."""
        due = None if self.alarm is None else self.alarm()
        if due is None or due <= self.now or (self._events and self._events[0][0] <= due):
            return None
        return due

    def _waiting_for_real_reply(self) -> bool:
        """The next event is a completion whose real reply has not been collected yet."""
        return bool(self._events) and self._events[0][1] == COMPLETION and self._events[0][3] not in self.arrived

    def _complete(self, task: VirtualTask) -> EmulatedReply:
        real = self.arrived.pop(task.message_id)
        metadata = SimpleNamespace(src_node_id=task.node_id, reply_to_message_id=task.message_id)
        if real.has_error():
            return EmulatedReply(metadata, error=SimpleNamespace(code=real.error.code, reason=real.error.reason))
        content = real.content
        # The virtual clock's training time and walltime left, as a SuperNode in that job would report.
        virtual_seconds = task.steps * self.campaign.facility(task.facility).seconds_per_step
        content[protocol.METRICS][TrainReport.KEYS["seconds"]] = virtual_seconds
        node = NodeInfo.from_record(content[protocol.NODE])
        content[protocol.NODE] = ConfigRecord(
            NodeInfo(node.facility, self.jobs[task.facility].end - self.now).to_record()
        )
        return EmulatedReply(metadata, content=content)

    # --- events --------------------------------------------------------------------------------

    def _schedule(self, at: float, kind: int, payload) -> None:
        heapq.heappush(self._events, (at, kind, next(self._seq), payload))

    def _step(self) -> EmulatedReply | None:
        """Apply the next event; a reply for completions and losses."""
        at, kind, _, payload = heapq.heappop(self._events)
        self.now = max(self.now, at)
        if kind == COMPLETION:
            return self._complete(self.in_flight.pop(payload))
        if kind == LOSS:
            task = self.in_flight.pop(payload)
            return EmulatedReply(
                SimpleNamespace(src_node_id=task.node_id, reply_to_message_id=task.message_id),
                error=SimpleNamespace(
                    code=NODE_UNAVAILABLE,
                    reason=f"walltime: {task.facility}'s batch job ended before the task finished",
                ),
            )
        if kind == JOB_START:
            self._start_job(payload)
        else:
            self._end_job(payload)
        return None

    def _queue_job(self, facility: str, index: int, queued: float, not_before: float = 0.0) -> Job:
        """Submit job `index` at `queued`: it starts after its queue wait, and not before `not_before`
        (the end of the job it is queued behind)."""
        job = Job(index, max(not_before, queued + self.campaign.queue_wait(facility, index)))
        self.record(protocol.to_json(JobLine(facility, index, "queued", queued)))
        self._schedule(job.start, JOB_START, (facility, index))
        return job

    def _start_job(self, payload: tuple[str, int]) -> None:
        facility, index = payload
        if self.jobs[facility].index != index:  # the job queued ahead takes over
            self.jobs[facility] = self.queued_ahead.pop(facility)
        job = self.jobs[facility]
        job.running, job.end = True, job.start + self.campaign.facility(facility).walltime
        self._record_job(facility, job.index, "running")
        self._schedule(job.end, JOB_END, facility)
        if self.campaign.queue_ahead:  # the next job waits in the queue while this one runs
            self.queued_ahead[facility] = self._queue_job(facility, index + 1, self.now, not_before=job.end)

    def _end_job(self, facility: str) -> None:
        job = self.jobs[facility]
        job.running, job.ended = False, True
        self._record_job(facility, job.index, "ended")
        if not self.campaign.queue_ahead:
            self.jobs[facility] = self._queue_job(facility, job.index + 1, self.now)  # the launcher resubmits at once

    def _record_job(self, facility: str, index: int, state: str, reason: str | None = None) -> None:
        self.record(protocol.to_json(JobLine(facility, index, state, self.now, reason=reason)))


def emulated_run(
    nodes: Grid,
    campaign: CampaignSpec,
    real_node_of: dict[str, int],
    spec: StrategySpec,
    record: Callable[[dict], None],
    alarm: Callable[[], float | None],
    objective: str,
) -> tuple[EmulatedGrid, RunHooks]:
    """(EmulatedGrid, RunHooks) for a virtual-time campaign over `nodes` (real SuperNodes, or the
    surrogate's): virtual clock, batch jobs, queue waits, and the run line first (no checkpoints:
    the campaign is rerun from its seed instead). `alarm` is the rule's next deadline: the virtual
    clock stops there, so a rule that aggregates on a clock does it on time."""
    facilities = [f.name for f in campaign.facilities]
    run_line = RunLine(
        strategy=spec.name,
        campaign=campaign.name,
        seed=campaign.seed,
        virtual_time=True,
        facilities={name: {"nodes": 1, "supernodes": 1} for name in facilities},
        objective=objective,
    )
    record(protocol.to_json(run_line))
    emulated = EmulatedGrid(nodes, campaign, real_node_of, spec.local_steps, record, alarm=alarm)
    hooks = RunHooks(
        record=record,
        clock=emulated.clock,
        sleep=emulated.sleep,
        facility_of={emulated.node_id(name): name for name in facilities},
    )
    return emulated, hooks
