"""Chat-formatted training examples: the instruction is context, only the answer is learned.

An example is rendered with the tokenizer's own chat template; prompt tokens get label -100 so
the loss covers the answer (and the end-of-turn token that teaches the model to stop). Examples
longer than `max_length` are cut at the end and counted; one whose answer would vanish entirely
is dropped and counted. Nothing is cut silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

IGNORE_INDEX = -100


def chat_messages(instruction: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*messages, {"role": "user", "content": instruction}]


def render_prompt(tokenizer, instruction: str, system_prompt: str | None = None) -> str:
    """The text a model continues at inference: the chat up to the assistant's turn."""
    return tokenizer.apply_chat_template(
        chat_messages(instruction, system_prompt), tokenize=False, add_generation_prompt=True
    )


def render_answer(tokenizer, instruction: str, answer: str, system_prompt: str | None = None) -> tuple[str, str]:
    """(prompt text, answer text) whose concatenation is the chat template's full rendering."""
    prompt = render_prompt(tokenizer, instruction, system_prompt)
    full = tokenizer.apply_chat_template(
        [*chat_messages(instruction, system_prompt), {"role": "assistant", "content": answer}],
        tokenize=False,
    )
    if not full.startswith(prompt):
        raise ValueError(
            "this tokenizer's chat template renders the conversation so that the prompt is not a "
            "prefix of the full chat; completion-only masking needs a template where it is"
        )
    return prompt, full[len(prompt) :]


@dataclass
class FormattingReport:
    examples: int = 0
    truncated: int = 0  # kept, answer cut at max_length
    dropped: int = 0  # the prompt alone filled max_length: no answer token left
    answer_tokens: int = 0
    dropped_indices: list[int] = field(default_factory=list)

    def as_metrics(self) -> dict[str, int]:
        return {
            "examples": self.examples,
            "truncated": self.truncated,
            "dropped": self.dropped,
            "answer_tokens": self.answer_tokens,
        }


def tokenize_record(
    tokenizer, record: dict, max_length: int, system_prompt: str | None = None
) -> tuple[dict[str, list[int]] | None, bool]:
    """(example, truncated): input_ids / labels / attention_mask, or None when the prompt alone
    fills `max_length` (no answer token would be left)."""
    if max_length < 2:
        raise ValueError(f"max_length = {max_length} leaves no room for an answer")
    prompt, answer = render_answer(tokenizer, record["input"], record["output"], system_prompt)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if len(prompt_ids) >= max_length:
        return None, False
    input_ids = (prompt_ids + answer_ids)[:max_length]
    labels = [IGNORE_INDEX] * len(prompt_ids) + input_ids[len(prompt_ids) :]
    example = {"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)}
    return example, len(input_ids) < len(prompt_ids) + len(answer_ids)


class LazyExamples(Sequence):
    """Records tokenized on first use, each once. A round trains on a few dozen of a shard's
    thousands of records, and a deployed ClientApp starts fresh for every message: tokenizing the
    whole shard up front would cost more than the round's training. Item i is None when record i
    is dropped; `report` counts what has been tokenized so far."""

    def __init__(self, tokenizer, records: Sequence[dict], max_length: int, system_prompt: str | None = None):
        self.tokenizer, self.records, self.max_length, self.system_prompt = (
            tokenizer,
            records,
            max_length,
            system_prompt,
        )
        self.report = FormattingReport()
        self._cache: dict[int, dict[str, list[int]] | None] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, list[int]] | None:
        if index not in self._cache:
            example, truncated = tokenize_record(
                self.tokenizer, self.records[index], self.max_length, self.system_prompt
            )
            self._cache[index] = example
            if example is None:
                self.report.dropped += 1
                self.report.dropped_indices.append(index)
            else:
                self.report.examples += 1
                self.report.truncated += truncated
                self.report.answer_tokens += sum(label != IGNORE_INDEX for label in example["labels"])
        return self._cache[index]


def tokenize_examples(
    tokenizer,
    records: Sequence[dict],
    max_length: int,
    system_prompt: str | None = None,
) -> tuple[list[dict[str, list[int]]], FormattingReport]:
    """input_ids / labels / attention_mask per kept record, and the truncation report."""
    lazy = LazyExamples(tokenizer, records, max_length, system_prompt)
    examples = [example for example in (lazy[i] for i in range(len(lazy))) if example is not None]
    return examples, lazy.report
