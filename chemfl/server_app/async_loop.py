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

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from chemfl.errors import ChemFLError
from chemfl.server_app.async_strategies import FedAsync, FedAvgRounds, FedBuff, NodeView, TaskOutcome, Update, Verdict
from chemfl.server_app.checkpoint import AsyncState, Checkpointer

Params = dict[str, np.ndarray]


@dataclass(frozen=True)
class StopRule:
    """Stop at whichever comes first; 0 switches a rule off (num_versions is always on)."""

    num_versions: int
    max_seconds: float = 0.0
    target_loss: float = 0.0


@dataclass(frozen=True)
class AsyncSpec:
    concurrency: int = 0  # max messages in flight in all; 0: one per online node
    message_ttl: float = 3600.0
    max_update_norm: float = 0.0  # 0: no bound on ||y - x_sent||
    eval_every: int = 1  # versions between centralized evaluations (0: first and last only)
    poll_seconds: float = 0.2


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
    strategy: FedBuff | FedAsync | FedAvgRounds
    state: AsyncState
    spec: AsyncSpec
    stop: StopRule
    evaluate: Callable[[int, Params], float | None]  # (version, params) -> eval loss, or None if not due
    record: Callable[[dict], None]  # one metrics.jsonl line
    checkpointer: Checkpointer | None = None
    train_config: dict = field(default_factory=dict)
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
            self.record(
                {
                    "event": "version",
                    "version": 0,
                    "wall_time": self.elapsed(),
                    **({"eval_loss": loss} if loss is not None else {}),
                }
            )
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
            if not arrived:
                self.sleep(self.spec.poll_seconds)
        log(INFO, "stopping: %s", self._stop_reason())
        if self.state.last_evaluated != self.state.version:
            self._evaluate(force=True)
        return self.state.params

    # --- stopping ------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return self.clock() - self._started

    def _should_stop(self) -> bool:
        return self._stop_reason() is not None

    def _stop_reason(self) -> str | None:
        if self.state.version >= self.stop.num_versions:
            return f"{self.stop.num_versions} versions published"
        if self.stop.max_seconds > 0 and self.elapsed() >= self.stop.max_seconds:
            return f"wall-clock budget of {self.stop.max_seconds:.0f} s reached"
        if self.stop.target_loss > 0 and self.last_loss is not None and self.last_loss <= self.stop.target_loss:
            return f"test loss {self.last_loss:.4f} reached the target {self.stop.target_loss:.4f}"
        return None

    # --- dispatch ------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        online = set(self.grid.get_node_ids())
        for node_id in [n for n in self.in_flight if n not in online]:
            self._lose(node_id, "node left the online list")
        limit = self.spec.concurrency or len(online)
        idle = sorted(n for n in online if n not in self.in_flight)
        candidates = idle[: max(0, limit - len(self.in_flight))]
        now = self.elapsed()
        plans = self.strategy.plan_dispatch(
            [NodeView(n, self._facility(n), now) for n in candidates], len(self.in_flight), len(online)
        )
        for node_id in [n for n in candidates if n in plans]:
            self.state.task_counter += 1
            steps = plans[node_id].local_steps
            config = {
                **self.train_config,
                "server-round": self.state.version,
                "server-version": self.state.version,
                "task-id": self.state.task_counter,
                **({"local-steps": steps} if steps is not None else {}),
            }
            message = Message(
                RecordDict({"arrays": to_record(self.state.params), "config": ConfigRecord(config)}),
                dst_node_id=node_id,
                message_type="train",
                ttl=self.spec.message_ttl,
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
        self.record(
            {
                "event": "lost",
                "node": node_id,
                "facility": self.facility_of.get(node_id),
                "version_sent": lost.version,
                "reason": reason,
                "time": self.elapsed(),
                "dispatch_time": lost.sent_at,
                "steps": lost.steps,
            }
        )
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
        if "node" in content:
            self.facility_of[node_id] = str(content["node"].get("facility", node_id))
        sent = self.sent_params[flight.version]
        params, problem = (
            validate_update(content["arrays"], self.state.params, self.spec.max_update_norm, sent)
            if "arrays" in content
            else (None, "no adapter in the reply")
        )
        metrics = content.get("metrics", {})
        node = content.get("node", {})
        outcome = TaskOutcome(
            node_id,
            self._facility(node_id),
            flight.sent_at,
            self.elapsed(),
            int(metrics["steps"]) if "steps" in metrics else None,
            float(metrics["seconds"]) if "seconds" in metrics else None,
            float(node["walltime-remaining"]) if "walltime-remaining" in node else None,
        )
        self.strategy.observe(outcome)
        if params is None:
            verdict = Verdict(self.state.version - flight.version, 0.0, False, f"rejected: {problem}")
            log(WARNING, "node %s (%s): update rejected: %s", node_id, self.facility_of.get(node_id, "?"), problem)
            self.state.counters["rejected"] += 1
            published = self.strategy.discard(self.state.params, outcome)
        else:
            update = Update(
                node_id,
                flight.version,
                params,
                int(metrics.get("num-examples", 0)),
                float(metrics.get("train-loss", float("nan"))),
            )
            verdict, published = self.strategy.submit(self.state.params, self.state.version, sent, update)
            self.state.counters["accepted" if verdict.accepted else verdict.reason] += 1
            self.state.updates_by_facility[self.facility_of.get(node_id, str(node_id))] += int(verdict.accepted)
        self.record(
            {
                "event": "update",
                "node": node_id,
                "facility": self.facility_of.get(node_id),
                "version_sent": flight.version,
                "version": self.state.version,
                "staleness": verdict.staleness,
                "weight": verdict.weight,
                "accepted": verdict.accepted,
                "reason": verdict.reason,
                "arrival_time": self.elapsed(),
                "train_loss": metrics.get("train-loss"),
                "train_seconds": metrics.get("seconds"),
                "dispatch_time": flight.sent_at,
                "steps": outcome.steps,
                "walltime_remaining": outcome.walltime_remaining,
            }
        )
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
        line = {
            "event": "version",
            "version": self.state.version,
            "wall_time": self.elapsed(),
            "counters": dict(self.state.counters),
            "updates_by_facility": dict(self.state.updates_by_facility),
            "server_seconds": self.server_seconds,
            "evaluation_seconds": self.evaluation_seconds,
        }
        # Both taken before this version's evaluation, like wall_time.
        loss = self._evaluate(force=self.state.version >= self.stop.num_versions)
        if loss is not None:
            line["eval_loss"] = loss
        buffer = len(getattr(self.strategy, "buffer", []))
        log(
            INFO,
            "version %d | %.0f s | buffer %d | updates %s%s",
            self.state.version,
            line["wall_time"],
            buffer,
            ", ".join(f"{k} {v}" for k, v in sorted(self.state.updates_by_facility.items())),
            "" if loss is None else f" | test loss {loss:.3f}",
        )
        self.record(line)

    def _evaluate(self, force: bool) -> float | None:
        every = self.spec.eval_every
        if not force and not (every > 0 and self.state.version % every == 0):
            return None
        started = time.perf_counter()
        loss = self.evaluate(self.state.version, self.state.params)
        self.evaluation_seconds += time.perf_counter() - started
        self.state.last_evaluated = self.state.version
        if loss is not None:
            self.last_loss = loss
        return loss


def check_async_spec(spec: AsyncSpec, stop: StopRule) -> None:
    if spec.concurrency < 0:
        raise ChemFLError(f"strategy.concurrency = {spec.concurrency} must be >= 0 (0: every online node)")
    if stop.num_versions < 1:
        raise ChemFLError(f"strategy.num-versions = {stop.num_versions} must be >= 1")
    if spec.message_ttl <= 0:
        raise ChemFLError(f"strategy.message-ttl = {spec.message_ttl} must be > 0 seconds")
