"""Evaluation on held-out records: answer-token loss (teacher forcing) and chemistry metrics on
greedy generations, scored by chemfl.data_prep.metrics."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from chemfl.config import Scalar
from chemfl.data_prep.formatting import render_prompt, tokenize_examples
from chemfl.data_prep.metrics import score
from chemfl.errors import ChemFLError
from chemfl.llm.training import answer_token_loss, collate


@dataclass(frozen=True)
class EvalSpec:
    loss_per_task: int  # records per task for the loss
    generate_per_task: int  # records per task for generation metrics (0: loss only)
    max_new_tokens: int
    batch_size: int

    @classmethod
    def from_config(cls, config: dict[str, Scalar], prefix: str = "eval") -> EvalSpec:
        spec = cls(
            int(config[f"{prefix}.loss-per-task"]),
            int(config[f"{prefix}.generate-per-task"]),
            int(config[f"{prefix}.max-new-tokens"]),
            int(config[f"{prefix}.batch-size"]),
        )
        for key, value, least in (
            ("loss-per-task", spec.loss_per_task, 0),
            ("generate-per-task", spec.generate_per_task, 0),
            ("max-new-tokens", spec.max_new_tokens, 1),
            ("batch-size", spec.batch_size, 1),
        ):
            if value < least:
                raise ChemFLError(f"{prefix}.{key} = {value} must be >= {least}")
        return spec


def per_task_head(records: Sequence[dict], per_task: int) -> list[dict]:
    """The first `per_task` records of each task: a fixed, stratified, cheap sample."""
    taken: dict[str, int] = defaultdict(int)
    chosen = []
    for record in records:
        if taken[record["task"]] < per_task:
            taken[record["task"]] += 1
            chosen.append(record)
    return chosen


@torch.no_grad()
def answer_loss(
    model, tokenizer, records: Sequence[dict], max_length: int, batch_size: int, system_prompt: str | None
) -> float:
    """Mean cross-entropy per answer token."""
    examples, _ = tokenize_examples(tokenizer, records, max_length, system_prompt)
    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {
            k: v.to(device) for k, v in collate(examples[start : start + batch_size], tokenizer.pad_token_id).items()
        }
        loss_sum, tokens = answer_token_loss(model, batch)
        total += loss_sum.item()
        count += tokens
    return total / max(count, 1)


@torch.no_grad()
def generate(
    model, tokenizer, records: Sequence[dict], max_new_tokens: int, batch_size: int, system_prompt: str | None
) -> list[str]:
    """Greedy completions of each record's instruction (left-padded batches)."""
    device = next(model.parameters()).device
    model.eval()
    outputs = []
    for start in range(0, len(records), batch_size):
        prompts = [render_prompt(tokenizer, r["input"], system_prompt) for r in records[start : start + batch_size]]
        encoded = [{"input_ids": tokenizer(p, add_special_tokens=False)["input_ids"]} for p in prompts]
        for item in encoded:
            item["attention_mask"] = [1] * len(item["input_ids"])
        batch = collate(encoded, tokenizer.pad_token_id, left=True)
        generated = model.generate(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = generated[:, batch["input_ids"].shape[1] :]
        outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return outputs


def evaluate(
    model, tokenizer, records: Sequence[dict], spec: EvalSpec, max_length: int, system_prompt: str | None
) -> dict:
    """{"loss", "n_loss", "n_generated", "tasks": per-task metrics, "overall": macro means}."""
    loss_records = per_task_head(records, spec.loss_per_task)
    result: dict = {
        "loss": answer_loss(model, tokenizer, loss_records, max_length, spec.batch_size, system_prompt),
        "n_loss": len(loss_records),
        "n_generated": 0,
        "tasks": {},
        "overall": {},
    }
    if spec.generate_per_task > 0:
        generation_records = per_task_head(records, spec.generate_per_task)
        texts = generate(model, tokenizer, generation_records, spec.max_new_tokens, spec.batch_size, system_prompt)
        scores = score(generation_records, texts)
        result.update(n_generated=len(generation_records), tasks=scores["tasks"], overall=scores["overall"])
    return result


def evaluate_at_facility(session, config: dict[str, Scalar], records: Sequence[dict], on_test_set: bool):
    """A facility's evaluate task, the same in the ClientApp and the facility trainer: on the
    held-out test set (`eval.at` names the facility) exactly the server's central evaluation; on
    its validation shard the loss, with generation metrics only if eval.node-generate-per-task > 0.
    Returns (the full result, the EvalReport scalars that travel)."""
    from chemfl.protocol import EvalReport

    spec = EvalSpec.from_config(config)
    if not on_test_set:
        spec = replace(spec, generate_per_task=int(config["eval.node-generate-per-task"]))
    result = evaluate(
        session.model,
        session.tokenizer,
        records,
        spec,
        int(config["train.max-length"]),
        str(config["model.system-prompt"]),
    )
    exact_match = result["overall"]["exact_match"] if result["overall"] else None
    return result, EvalReport(result["n_loss"], result["loss"], exact_match)
