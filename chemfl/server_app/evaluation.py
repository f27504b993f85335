"""Centralized evaluation of the global adapter on the held-out test set, checkpoints and
metrics.jsonl lines, and the before/after table."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, MetricRecord
from flwr.common.logger import log
from rich.console import Console
from rich.table import Table

from chemfl import protocol
from chemfl.llm.evaluation import EvalSpec, evaluate
from chemfl.llm.lora import load_packed_state
from chemfl.protocol import EvalReport, EvaluationLine, RoundLine, TrainReport, VersionLine


class LocalEvaluation:
    """Evaluation in the ServerApp's own process, on the base model it loaded (`eval.at = "server"`)."""

    def __init__(self, session, test_records, spec: EvalSpec, config: dict):
        self.session, self.test_records, self.spec = session, test_records, spec
        self.max_length = int(config["train.max-length"])
        self.system_prompt = str(config["model.system-prompt"])

    def __call__(self, step: int, state: dict) -> dict:
        load_packed_state(self.session.model, self.session.lora_spec, state, None)
        return evaluate(
            self.session.model,
            self.session.tokenizer,
            self.test_records,
            self.spec,
            self.max_length,
            self.system_prompt,
        )


class CentralEvaluator:
    """Evaluates a global adapter on the held-out test set, saves it, and keeps the history.

    `run_evaluation(step, state) -> result` is where the work happens: `LocalEvaluation` in this
    process, or a facility's GPUs (`eval.at`, chemfl.server_app.facility_evaluation); either way
    the result has the same fields. Called as Flower's `evaluate_fn` (FedAvg: round 0 and after
    every round) it evaluates at round 0, every `eval.every` rounds and at the last round, and
    appends one metrics.jsonl line per call (round, wall time, train loss, facilities, bytes,
    eval). Each evaluated adapter is saved as outputs/<run>/adapter-<step name>-<n> (unless
    outputs.keep-every-adapter = false), and as outputs/<run>/adapter (the latest evaluated one,
    i.e. the final one at the end). `adapter_model` is the peft model the adapters are saved from:
    the loaded model, or the weightless skeleton of chemfl.llm.adapter_init.
    """

    def __init__(
        self,
        adapter_model,
        lora_spec,
        run_evaluation: Callable[[int, dict], dict],
        config: dict,
        outputs,
        num_rounds: int,
        rounds: dict[int, dict],
    ):
        self.adapter_model, self.lora_spec, self.run_evaluation = adapter_model, lora_spec, run_evaluation
        self.outputs = outputs
        self.every = int(config["eval.every"])
        self.keep_every_adapter = bool(config["outputs.keep-every-adapter"])
        self.num_rounds = num_rounds
        self.rounds = rounds  # filled by the strategy's listener
        self.history: list[dict] = []
        self.started = time.perf_counter()

    def evaluate_state(self, step_name: str, step: int, state: dict) -> dict:
        started = time.perf_counter()
        result = self.run_evaluation(step, state)
        result["seconds"] = time.perf_counter() - started
        self.keep(step_name, step, state, result)
        return result

    def keep(self, step_name: str, step: int, state: dict, result: dict) -> None:
        """Save the evaluated adapter and remember its result (for the before/after table)."""
        load_packed_state(self.adapter_model, self.lora_spec, state, None)
        if self.keep_every_adapter:
            self.outputs.save_adapter(self.adapter_model, f"adapter-{step_name}-{step}")
        self.outputs.save_adapter(self.adapter_model, "adapter")
        self.history.append({step_name: step, "eval": result})

    def facility_result(self, facility: str, request, result: dict, wall_time: float) -> None:
        """A facility's evaluation of an asynchronous version came back (eval.at): keep it and
        write its evaluation line."""
        result["seconds"] = wall_time - request.requested_at
        self.keep("version", request.step, request.params, result)
        line = EvaluationLine(request.step, request.requested_at, wall_time, facility, float(result["loss"]), result)
        self.outputs.append_metrics(protocol.to_json(line))
        log(INFO, "version %d evaluated at %s: test loss %.3f", request.step, facility, result["loss"])

    def due(self, server_round: int) -> bool:
        return server_round in (0, self.num_rounds) or (self.every > 0 and server_round % self.every == 0)

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's `evaluate_fn` for synchronous rounds: evaluates when due, writes the round line."""
        result = self.evaluate_state("round", server_round, numpy_state(arrays)) if self.due(server_round) else None
        stats = self.rounds.get(server_round, {})
        line = RoundLine(round=server_round, wall_time=time.perf_counter() - self.started, eval=result, **stats)
        self.outputs.append_metrics(protocol.to_json(line))
        log(INFO, "%s", progress_line(line, self.num_rounds))
        return None if result is None else metric_record(result)

    def with_result(self, line: dict) -> dict:
        """A metrics line of the asynchronous loop, with the full result (per-task metrics) added to
        a version line this process has just evaluated: the loop itself sees only the loss, and round
        lines carry theirs."""
        last = self.history[-1] if self.history else {}
        evaluated = line.get("event") == VersionLine.EVENT and line.get("eval_loss") is not None
        if evaluated and last.get("version") == line.get("version"):
            return {**line, "eval": last["eval"]}
        return line

    def evaluate_version(self, version: int, arrays: ArrayRecord) -> MetricRecord:
        """`evaluate_fn` for the asynchronous strategies: they decide when, and write version lines."""
        return metric_record(self.evaluate_state("version", version, numpy_state(arrays)))


def numpy_state(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """The packed adapter of a record, as the evaluations and saves take it."""
    return {name: array.numpy() for name, array in arrays.items()}


def metric_record(result: dict) -> MetricRecord:
    """What an evaluation reports to Flower: `eval-loss` (the key the asynchronous strategies stop
    on) and the overall exact match."""
    report = EvalReport(result["n_loss"], result["loss"], (result["overall"] or {}).get("exact_match"))
    return MetricRecord(report.to_metrics())


def progress_line(line: RoundLine, num_rounds: int) -> str:
    parts = [f"round {line.round}/{num_rounds}", f"{line.wall_time:.0f} s"]
    if line.facilities:
        parts.append("trained: " + ", ".join(line.facilities))
    train_loss = TrainReport.KEYS["train_loss"]
    if train_loss in line.train:
        parts.append(f"train loss {line.train[train_loss]:.3f}")
    if line.eval is not None:
        parts.append(f"test loss {line.eval['loss']:.3f}")
        if line.eval["overall"]:
            parts.append(f"exact match {line.eval['overall']['exact_match']:.3f}")
    return " | ".join(parts)


def before_after_table(history: list[dict]) -> str:
    """The first and last centralized evaluations side by side, per task."""
    if len(history) < 2:
        return ""
    before, after = history[0]["eval"], history[-1]["eval"]
    step_name = next(key for key in history[0] if key != "eval")
    table = Table(
        title=f"Test set before ({step_name} {history[0][step_name]}) and after "
        f"({step_name} {history[-1][step_name]}) training"
    )
    for column in ("metric", "before", "after"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    table.add_row("loss per answer token", f"{before['loss']:.3f}", f"{after['loss']:.3f}")
    for task, metrics in after["tasks"].items():
        old = before["tasks"].get(task, {})
        table.add_row(f"{task} exact match", f"{old.get('exact_match', 0):.2f}", f"{metrics['exact_match']:.2f}")
        if metrics.get("rmse") is not None or old.get("rmse") is not None:
            fmt = lambda value: "-" if value is None else f"{value:.2f}"  # noqa: E731
            table.add_row(f"{task} rmse", fmt(old.get("rmse")), fmt(metrics.get("rmse")))
        table.add_row(f"{task} invalid", f"{old.get('invalid_rate', 0):.2f}", f"{metrics['invalid_rate']:.2f}")
    if after["overall"]:
        table.add_row(
            "overall exact match",
            f"{before['overall'].get('exact_match', 0):.3f}",
            f"{after['overall']['exact_match']:.3f}",
        )
    buffer = io.StringIO()
    Console(file=buffer, width=100).print(table)
    return buffer.getvalue()
