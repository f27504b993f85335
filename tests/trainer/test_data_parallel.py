"""Data-parallel training is exact: two ranks (torchrun, gloo) with batch b end with the adapter one
process ends with at batch 2b, on the same examples and seed, also with gradient accumulation."""

from __future__ import annotations

import pytest
from accelerate import Accelerator

from chemfl.data_prep.formatting import LazyExamples
from chemfl.data_prep.shards import load_shard
from chemfl.llm.training import DataParallel, TrainSpec, train_local
from tests.trainer.harness import as_arrays, fresh_adapter, max_difference, run_two_ranks

DDP_BOUND = 1e-5
SEED = 7


def train_on_two_ranks(setup, folder, grad_accums: tuple[int, ...]) -> dict[int, dict]:
    """{grad_accum: {"arrays", "loss", "tokens"}} from tests/trainer/data_parallel_ranks.py."""
    case = {"config": setup.config, "shard": str(setup.shard), "seed": SEED, "grad_accum": grad_accums}
    saved = run_two_ranks("data_parallel_ranks.py", case, folder)
    return {
        accum: {
            "arrays": {key.split("/", 1)[1]: saved[key] for key in saved.files if key.startswith(f"{accum}/")},
            "loss": float(saved[f"{accum}:loss"]),
            "tokens": int(saved[f"{accum}:tokens"]),
        }
        for accum in grad_accums
    }


def train_alone(setup, batch_size: int, grad_accum: int, data_parallel: DataParallel | None = None):
    model, tokenizer = fresh_adapter(setup.config)
    spec = TrainSpec.from_config({**setup.config, "train.batch-size": batch_size, "train.grad-accum": grad_accum})
    shard = load_shard(setup.shard)
    examples = LazyExamples(tokenizer, shard.train, spec.max_length, str(setup.config["model.system-prompt"]))
    result = train_local(model, examples, spec, tokenizer.pad_token_id, SEED, Accelerator(cpu=True), data_parallel)
    return as_arrays(model, setup.config), result


def test_two_ranks_at_batch_b_equal_one_process_at_batch_2b(trainer_setup, tmp_path):
    batch = int(trainer_setup.config["train.batch-size"])
    ranks = train_on_two_ranks(trainer_setup, tmp_path, (1, 2))

    # grad_accum 1: the ClientApp's loop itself (no data parallel), batch 2b.
    alone, result = train_alone(trainer_setup, 2 * batch, 1)
    difference = max_difference(ranks[1]["arrays"], alone)
    # grad_accum 2: one process under the data-parallel rule (token mean over the whole step), batch 2b.
    alone_accumulating, result_accumulating = train_alone(trainer_setup, 2 * batch, 2, DataParallel(0, 1))
    difference_accumulating = max_difference(ranks[2]["arrays"], alone_accumulating)
    print(
        f"max abs difference, 2 ranks x batch {batch} vs 1 process x batch {2 * batch}: "
        f"{difference:.2e} (grad_accum 1), {difference_accumulating:.2e} (grad_accum 2)"
    )
    assert difference < DDP_BOUND and difference_accumulating < DDP_BOUND
    assert ranks[1]["loss"] == pytest.approx(result.loss, rel=1e-5)
    assert ranks[2]["loss"] == pytest.approx(result_accumulating.loss, rel=1e-5)
    assert (ranks[1]["tokens"], ranks[2]["tokens"]) == (result.tokens, result_accumulating.tokens)

    # The comparison can tell: one process at batch b alone ends elsewhere.
    assert max_difference(ranks[1]["arrays"], train_alone(trainer_setup, batch, 1)[0]) > 100 * DDP_BOUND
