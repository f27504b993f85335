"""Tokens/s of the ClientApp's training loop (chemfl.llm.training.train_local) against a plain peft
training loop, same model, data, batches and steps, measured alternately in one process.

    python bench/train_throughput.py [--run-config recipes/laptop.toml] [--steps 8] [--repeats 3]

Target (training issue): ratio >= 0.9.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from chemfl.config import resolve
from chemfl.data_prep.build import BuildSpec, build_dataset
from chemfl.data_prep.cli import load_run_config
from chemfl.data_prep.formatting import tokenize_examples
from chemfl.data_prep.shards import load_shard
from chemfl.llm.lora import exchanged_state, load_exchanged_state
from chemfl.llm.session import get_session
from chemfl.llm.training import TrainSpec, collate, example_stream, train_local


def plain_peft_loop(model, examples, spec: TrainSpec, pad_id: int, seed: int) -> tuple[int, float]:
    """The loop a peft tutorial writes: AdamW, forward with labels, backward, step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.lr)
    stream = example_stream(examples, seed)
    model.train()
    tokens, started = 0, time.perf_counter()
    for _ in range(spec.local_steps):
        batch = collate([next(stream) for _ in range(spec.batch_size)], pad_id)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        tokens += int(batch["attention_mask"].sum())
    return tokens, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-config", default="recipes/laptop.toml")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = resolve({**load_run_config(args.run_config), "train.local-steps": args.steps})
    data_path = Path(str(config["data.path"]))
    build_dataset(BuildSpec.from_config(config), data_path)
    spec = TrainSpec.from_config(config)
    session = get_session(config)
    shard = load_shard(data_path / "partitions" / str(config["data.facilities"]).split(",")[0])
    examples, _ = tokenize_examples(session.tokenizer, shard.train, spec.max_length, str(config["model.system-prompt"]))
    initial = exchanged_state(session.model, session.lora_spec)
    pad = session.tokenizer.pad_token_id
    rates: dict[str, list[float]] = {"ClientApp loop (train_local)": [], "plain peft loop": []}
    for repeat in range(args.repeats + 1):  # the first pair warms up and is not counted
        for name in rates:
            load_exchanged_state(session.model, session.lora_spec, initial)
            if name.startswith("ClientApp"):
                result = train_local(session.model, examples, spec, pad, repeat, session.accelerator)
                tokens, seconds = result.tokens, result.seconds
            else:
                tokens, seconds = plain_peft_loop(session.model, examples, spec, pad, repeat)
            if repeat:
                rates[name].append(tokens / seconds)
    table = Table(
        title=f"Training throughput, {config['model.name']}, {args.steps} steps x batch "
        f"{spec.batch_size}, {torch.get_num_threads()} threads, {args.repeats} repeats"
    )
    for column in ("loop", "tokens/s (median)", "min", "max"):
        table.add_column(column, justify="right" if column != "loop" else "left")
    for name, values in rates.items():
        table.add_row(name, f"{statistics.median(values):.1f}", f"{min(values):.1f}", f"{max(values):.1f}")
    ours, plain = (statistics.median(v) for v in rates.values())
    table.add_row("[bold]ratio ClientApp / plain", f"{ours / plain:.3f}", "", "")
    Console(width=130).print(table)


if __name__ == "__main__":
    main()
