"""Centralized evaluation of the global adapter on the held-out test set, checkpoints and
metrics.jsonl lines, and the before/after table."""

from __future__ import annotations

import io
import time
from logging import INFO

from flwr.app import ArrayRecord, MetricRecord
from flwr.common.logger import log
from rich.console import Console
from rich.table import Table

from chemfl.llm.evaluation import EvalSpec, evaluate
from chemfl.llm.lora import load_exchanged_state


class CentralEvaluator:
    """Evaluates a global adapter on the held-out test set, saves it, and keeps the history.

    `evaluate_state` serves both run loops; called as Flower's `evaluate_fn` (FedAvg: round 0 and
    after every round) it evaluates at round 0, every `eval.every` rounds and at the last round,
    and appends one metrics.jsonl line per call (round, wall time, train loss, facilities, bytes,
    eval). Each evaluated adapter is saved as outputs/<run>/adapter-<step name>-<n> (unless
    outputs.keep-every-adapter = false), and as
    outputs/<run>/adapter (the latest evaluated one, i.e. the final one at the end).
    """

    def __init__(
        self, session, test_records, spec: EvalSpec, config: dict, outputs, num_rounds: int, rounds: dict[int, dict]
    ):
        self.session, self.test_records, self.spec, self.outputs = session, test_records, spec, outputs
        self.max_length = int(config["train.max-length"])
        self.system_prompt = str(config["model.system-prompt"])
        self.every = int(config["eval.every"])
        self.keep_every_adapter = bool(config["outputs.keep-every-adapter"])
        self.num_rounds = num_rounds
        self.rounds = rounds  # filled by the strategy's listener
        self.history: list[dict] = []
        self.started = time.perf_counter()

    def evaluate_state(self, step_name: str, step: int, state: dict) -> dict:
        load_exchanged_state(self.session.model, self.session.lora_spec, state)
        started = time.perf_counter()
        result = evaluate(
            self.session.model,
            self.session.tokenizer,
            self.test_records,
            self.spec,
            self.max_length,
            self.system_prompt,
        )
        result["seconds"] = time.perf_counter() - started
        if self.keep_every_adapter:
            self.outputs.save_adapter(self.session.model, f"adapter-{step_name}-{step}")
        self.outputs.save_adapter(self.session.model, "adapter")
        self.history.append({step_name: step, "eval": result})
        return result

    def due(self, server_round: int) -> bool:
        return server_round in (0, self.num_rounds) or (self.every > 0 and server_round % self.every == 0)

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        line = {"event": "round", "round": server_round, **self.rounds.get(server_round, {})}
        result = (
            self.evaluate_state("round", server_round, arrays.to_torch_state_dict()) if self.due(server_round) else None
        )
        if result is not None:
            line["eval"] = result
        line["wall_time"] = time.perf_counter() - self.started
        self.outputs.append_metrics(line)
        log(INFO, "%s", progress_line(line, self.num_rounds))
        if result is None:
            return None
        metrics = {"eval-loss": result["loss"]}
        if result["overall"]:
            metrics["exact-match"] = result["overall"]["exact_match"]
        return MetricRecord(metrics)


def progress_line(line: dict, num_rounds: int) -> str:
    parts = [f"round {line['round']}/{num_rounds}", f"{line['wall_time']:.0f} s"]
    if line.get("facilities"):
        parts.append("trained: " + ", ".join(line["facilities"]))
    if "train-loss" in line.get("train", {}):
        parts.append(f"train loss {line['train']['train-loss']:.3f}")
    if "eval" in line:
        parts.append(f"test loss {line['eval']['loss']:.3f}")
        if line["eval"]["overall"]:
            parts.append(f"exact match {line['eval']['overall']['exact_match']:.3f}")
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
