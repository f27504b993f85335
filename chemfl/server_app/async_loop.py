"""The asynchronous run loop on Flower's Grid (push_messages / pull_messages).

Every idle online node gets the current global adapter (at most one message in flight per node,
at most `concurrency` in all); replies are taken as they arrive, validated, handed to the
strategy, and the node is sent new work at once. Nodes that appear later (a batch job started)
are picked up; nodes that vanish (NODE_UNAVAILABLE, expired messages, a ClientApp exception, or
gone from the online list) lose their in-flight work without stalling the run and are used again
when they come back. Everything the loop decides is logged to metrics.jsonl.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from chemfl import protocol
from chemfl.protocol import LostLine, NodeInfo, PartialTrainReport, Task, UpdateLine, VersionLine
from chemfl.server_app.checkpoint import AsyncState, Checkpointer
from chemfl.server_app.grid import POLL_SECONDS
from chemfl.server_app.rules import (
    FedAsyncRule,
    FedAvgRoundsRule,
    FedBuffRule,
    FedCompassRule,
    FedQueueRule,
    NodeView,
    TaskOutcome,
    Update,
    Verdict,
)

Params = dict[str, np.ndarray]
Rule = FedBuffRule | FedAsyncRule | FedAvgRoundsRule | FedCompassRule | FedQueueRule


@dataclass(frozen=True)
class LoopSettings:
    """How the loop runs and when it stops (whichever comes first; 0 switches a limit off,
    num_versions is always on). The Flower strategies fill it from their arguments."""

    num_versions: int
    max_seconds: float
    target_loss: float
    concurrency: int  # max messages in flight in all; 0: one per online node
    message_ttl: float
    max_update_norm: float  # 0: no bound on ||y - x_sent||
    eval_every: int  # versions between centralized evaluations (0: first and last only)
    poll_seconds: float = POLL_SECONDS


class DeferredEvaluation(Protocol):
    """Central evaluation that runs elsewhere (a facility, `eval.at`): requested now, its loss
    collected when it comes back, so training never waits for it."""

    def request(self, step: int, params: Params, requested_at: float) -> None: ...

    def collect(self, now: float) -> list[tuple[int, float]]: ...  # (version, loss) back since the last call

    def pending(self) -> bool: ...


@dataclass(frozen=True)
class RecordKeys:
    """Where messages keep the adapter, the task and the update's weight (Flower's
    arrayrecord_key, configrecord_key and weighted_by_key)."""

    arrays: str = protocol.ARRAYS
    config: str = protocol.CONFIG
    weight: str = protocol.NUM_EXAMPLES


@dataclass
class InFlight:
    node_id: int
    message_id: str
    version: int
    task_id: int
    sent_at: float
    steps: int | None = None  # planned local steps; None: train.local-steps


def to_record(params: Params) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in params.items()})


def validate_update(arrays: ArrayRecord, template: Params, max_norm: float, sent: Params) -> tuple[Params | None, str]:
    """(params, "") for a well-formed update, else (None, reason): expected keys, shapes and
    dtypes, finite values, and ||y - x_sent|| within `max_norm` when it is set."""
    if set(arrays.keys()) != set(template):
        missing, extra = sorted(set(template) - set(arrays.keys())), sorted(set(arrays.keys()) - set(template))
        return None, f"keys differ (missing {missing[:2]}, unexpected {extra[:2]})"
    params = {}
    for name, expected in template.items():
        array = arrays[name]
        if tuple(array.shape) != expected.shape:
            return None, f"{name}: shape {tuple(array.shape)} != {expected.shape}"
        if array.dtype != str(expected.dtype):
            return None, f"{name}: dtype {array.dtype} != {expected.dtype}"
        value = array.numpy()
        if not np.all(np.isfinite(value)):
            return None, f"{name}: non-finite values"
        params[name] = value
    if max_norm > 0:
        norm = float(np.sqrt(sum(np.sum((params[k].astype(np.float64) - sent[k]) ** 2) for k in params)))
        if norm > max_norm:
            return None, f"update norm {norm:.3g} > strategy.max-update-norm {max_norm:.3g}"
    return params, ""


@dataclass
class AsyncRun:
    grid: Grid
    strategy: Rule
    state: AsyncState
    settings: LoopSettings
    evaluate: Callable[[int, Params], float | None]  # (version, params) -> eval loss, or None
    record: Callable[[dict], None]  # one metrics.jsonl line (chemfl.protocol.to_json)
    checkpointer: Checkpointer | None = None
    train_config: dict = field(default_factory=dict)
    keys: RecordKeys = field(default_factory=RecordKeys)
    deferred: DeferredEvaluation | None = None  # evaluation elsewhere: `evaluate` is not called
    on_update: Callable[[int, dict], None] | None = None  # (version it goes into, reply metrics) per accepted update
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    in_flight: dict[int, InFlight] = field(default_factory=dict)
    sent_params: dict[int, Params] = field(default_factory=dict)  # versions still referenced
    facility_of: dict[int, str] = field(default_factory=dict)
    last_loss: float | None = None
    server_seconds: float = 0.0
    evaluation_seconds: float = 0.0

    def run(self) -> Params:
        self._started = self.clock() - self.state.elapsed
        if self.state.version == 0 and not self.state.resumed:
            loss = self._evaluate(force=True)
            self.record(protocol.to_json(VersionLine(0, self.elapsed(), eval_loss=loss)))
        while not self._should_stop():
            with self._server_time():
                self._dispatch()
            arrived = (
                list(self.grid.pull_messages([f.message_id for f in self.in_flight.values()])) if self.in_flight else []
            )
            for reply in arrived:
                if self._should_stop():  # e.g. the wall-clock budget ran out while waiting
                    break
                with self._server_time():
                    self._receive(reply)
            self._collect_deferred()
            if not arrived:
                self.sleep(self.settings.poll_seconds)
        log(INFO, "stopping: %s", self._stop_reason())
        if self.state.last_evaluated != self.state.version:
            self._evaluate(force=True)
        self._wait_for_deferred()
        if self.checkpointer is not None:  # the end, its evaluation lines included: where a resume would start
            self.state.elapsed = self.elapsed()
            self.checkpointer.save(self.state, self.strategy)
        return self.state.params

    # --- stopping ------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return self.clock() - self._started

    def _should_stop(self) -> bool:
        return self._stop_reason() is not None

    def _stop_reason(self) -> str | None:
        limits = self.settings
        if self.state.version >= limits.num_versions:
            return f"{limits.num_versions} versions published"
        if limits.max_seconds > 0 and self.elapsed() >= limits.max_seconds:
            return f"wall-clock budget of {limits.max_seconds:.0f} s reached"
        if limits.target_loss > 0 and self.last_loss is not None and self.last_loss <= limits.target_loss:
            return f"test loss {self.last_loss:.4f} reached the target {limits.target_loss:.4f}"
        return None

    # --- dispatch ------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        # Rules that aggregate on a clock (a group's deadline, a round's forced end) publish here.
        self._publish(self.strategy.due(self.state.params, self.state.version, self.elapsed()))
        online = set(self.grid.get_node_ids())
        for node_id in [n for n in self.in_flight if n not in online]:
            self._lose(node_id, "node left the online list")
        limit = self.settings.concurrency or len(online)
        idle = sorted(n for n in online if n not in self.in_flight)
        candidates = idle[: max(0, limit - len(self.in_flight))]
        now = self.elapsed()
        plans = self.strategy.plan_dispatch(
            [NodeView(n, self._facility(n), now) for n in candidates], len(self.in_flight), len(online)
        )
        for node_id in [n for n in candidates if n in plans]:
            self.state.task_counter += 1
            plan = plans[node_id]
            steps = plan.local_steps
            task = Task(
                server_round=self.state.version,
                task_id=self.state.task_counter,
                local_steps=steps,
                lr_scale=plan.lr_scale,
            )
            content = {
                self.keys.arrays: to_record(self.state.params),
                self.keys.config: ConfigRecord({**self.train_config, **task.to_config()}),
            }
            message = Message(
                RecordDict(content),
                dst_node_id=node_id,
                message_type=protocol.TRAIN,
                ttl=self.settings.message_ttl,
            )
            [message_id] = list(self.grid.push_messages([message]))
            self.sent_params.setdefault(self.state.version, self.state.params)
            self.in_flight[node_id] = InFlight(
                node_id, message_id, self.state.version, self.state.task_counter, self.elapsed(), steps
            )

    def _facility(self, node_id: int) -> str:
        return self.facility_of.get(node_id, str(node_id))

    @contextmanager
    def _server_time(self):
        """Accumulates the server's own work per update (serialising, validating, aggregating,
        checkpointing), evaluation excluded, into `server_seconds`."""
        started, evaluating = time.perf_counter(), self.evaluation_seconds
        yield
        self.server_seconds += time.perf_counter() - started - (self.evaluation_seconds - evaluating)

    def _lose(self, node_id: int, reason: str) -> None:
        lost = self.in_flight.pop(node_id)
        self.state.counters["lost"] += 1
        log(
            WARNING,
            "node %s (%s): in-flight work from version %d lost: %s",
            node_id,
            self.facility_of.get(node_id, "?"),
            lost.version,
            reason,
        )
        line = LostLine(
            node_id, self.facility_of.get(node_id), lost.version, reason, self.elapsed(), lost.sent_at, lost.steps
        )
        self.record(protocol.to_json(line))
        outcome = TaskOutcome(node_id, self._facility(node_id), lost.sent_at, self.elapsed(), lost.steps, lost=True)
        self.strategy.observe(outcome)
        self._publish(self.strategy.discard(self.state.params, outcome))
        self._forget_unreferenced_versions()

    # --- arrivals ------------------------------------------------------------------------------

    def _receive(self, reply: Message) -> None:
        node_id = reply.metadata.src_node_id
        flight = self.in_flight.get(node_id)
        if flight is None or flight.message_id != reply.metadata.reply_to_message_id:
            return  # a reply to work already written off
        if reply.has_error():
            self._lose(node_id, f"{reply.error.reason} (error {reply.error.code})")
            return
        del self.in_flight[node_id]
        content = reply.content
        node = NodeInfo.from_record(content[protocol.NODE]) if protocol.NODE in content else None
        if node is not None:
            self.facility_of[node_id] = node.facility
        sent = self.sent_params[flight.version]
        params, problem = (
            validate_update(content[self.keys.arrays], self.state.params, self.settings.max_update_norm, sent)
            if self.keys.arrays in content
            else (None, "no adapter in the reply")
        )
        metrics = content.get(protocol.METRICS, {})
        report = PartialTrainReport.from_metrics(metrics)
        outcome = TaskOutcome(
            node_id,
            self._facility(node_id),
            flight.sent_at,
            self.elapsed(),
            None if report.steps is None else int(report.steps),
            None if report.seconds is None else float(report.seconds),
            None if node is None or node.walltime_remaining is None else float(node.walltime_remaining),
        )
        self.strategy.observe(outcome)
        if params is None:
            verdict = Verdict(self.state.version - flight.version, 0.0, False, f"rejected: {problem}")
            log(WARNING, "node %s (%s): update rejected: %s", node_id, self.facility_of.get(node_id, "?"), problem)
            self.state.counters["rejected"] += 1
            published = self.strategy.discard(self.state.params, outcome)
        else:
            train_loss = float("nan") if report.train_loss is None else float(report.train_loss)
            update = Update(node_id, flight.version, params, int(metrics.get(self.keys.weight, 0)), train_loss)
            verdict, published = self.strategy.submit(self.state.params, self.state.version, sent, update)
            self.state.counters["accepted" if verdict.accepted else verdict.reason] += 1
            self.state.updates_by_facility[self.facility_of.get(node_id, str(node_id))] += int(verdict.accepted)
            if verdict.accepted and self.on_update is not None:
                self.on_update(self.state.version + 1, dict(metrics))  # the next version aggregates it
        line = UpdateLine(
            node=node_id,
            facility=self.facility_of.get(node_id),
            version_sent=flight.version,
            version=self.state.version,
            staleness=verdict.staleness,
            weight=verdict.weight,
            accepted=verdict.accepted,
            reason=verdict.reason,
            arrival_time=self.elapsed(),
            train_loss=report.train_loss,
            train_seconds=report.seconds,
            dispatch_time=flight.sent_at,
            steps=outcome.steps,
            walltime_remaining=outcome.walltime_remaining,
        )
        self.record(protocol.to_json(line))
        self._publish(published)
        if self.checkpointer is not None:
            self.state.elapsed = self.elapsed()
            self.checkpointer.save(self.state, self.strategy)

    def _publish(self, published: Params | None) -> None:
        if published is None:
            return
        self.state.params = published
        self.state.version += 1
        self._forget_unreferenced_versions()
        self._on_new_version()

    def _forget_unreferenced_versions(self) -> None:
        live = {flight.version for flight in self.in_flight.values()} | {self.state.version}
        for version in [v for v in self.sent_params if v not in live]:
            del self.sent_params[version]

    def _on_new_version(self) -> None:
        # Times and counters are taken before this version's evaluation.
        wall_time, server_seconds, evaluation_seconds = self.elapsed(), self.server_seconds, self.evaluation_seconds
        loss = self._evaluate(force=self.state.version >= self.settings.num_versions)
        line = VersionLine(
            self.state.version,
            wall_time,
            dict(self.state.counters),
            dict(self.state.updates_by_facility),
            server_seconds,
            evaluation_seconds,
            loss,
        )
        buffer = len(getattr(self.strategy, "buffer", []))
        log(
            INFO,
            "version %d | %.0f s | buffer %d | updates %s%s",
            self.state.version,
            wall_time,
            buffer,
            ", ".join(f"{k} {v}" for k, v in sorted(self.state.updates_by_facility.items())),
            "" if loss is None else f" | test loss {loss:.3f}",
        )
        self.record(protocol.to_json(line))

    def _evaluate(self, force: bool) -> float | None:
        every = self.settings.eval_every
        if not force and not (every > 0 and self.state.version % every == 0):
            return None
        if self.deferred is not None:
            self.deferred.request(self.state.version, self.state.params, self.elapsed())
            self.state.last_evaluated = self.state.version
            return None
        started = time.perf_counter()
        loss = self.evaluate(self.state.version, self.state.params)
        self.evaluation_seconds += time.perf_counter() - started
        self.state.last_evaluated = self.state.version
        if loss is not None:
            self.last_loss = loss
        return loss

    def _collect_deferred(self) -> None:
        if self.deferred is None:
            return
        returned = sorted(self.deferred.collect(self.elapsed()))
        if returned:
            self.last_loss = returned[-1][1]  # the newest version's loss decides the target rule

    def _wait_for_deferred(self) -> None:
        """The final evaluation (and any still queued) comes back before the run ends; a facility
        that stays away longer than a task's TTL is given up on, with a warning."""
        if self.deferred is None:
            return
        deadline = self.clock() + self.settings.message_ttl
        while self.deferred.pending() and self.clock() < deadline:
            self._collect_deferred()
            self.sleep(self.settings.poll_seconds)
        self._collect_deferred()
        if self.deferred.pending():
            log(WARNING, "evaluations still pending after %.0f s; the run ends without them", self.settings.message_ttl)
