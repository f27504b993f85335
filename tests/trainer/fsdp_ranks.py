"""Run by torchrun from test_fsdp.py: the same training with train.distributed = "ddp" (every rank
holds the whole model) and "fsdp" (the base weights sharded over the ranks); rank 0 saves both
adapters, losses and tokens, and every rank's count of the base weights it holds.

    torchrun --standalone --nproc-per-node 2 tests/trainer/fsdp_ranks.py CASE.json OUT.npz
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch.distributed as dist
from accelerate import Accelerator
from torch.distributed.tensor import DTensor

from chemfl.data_prep.formatting import LazyExamples
from chemfl.data_prep.shards import load_shard
from chemfl.llm.lora import lora_parameters
from chemfl.llm.training import DataParallel, TrainSpec, shard_base_weights, train_local
from tests.trainer.harness import as_arrays, fresh_adapter


def base_weights_held(model) -> tuple[int, int]:
    """(elements of the base weights this rank holds, elements of the whole base model)."""
    adapter = {id(p) for p in lora_parameters(model).values()}
    held = whole = 0
    for parameter in model.parameters():
        if id(parameter) in adapter:
            continue
        local = parameter.to_local() if isinstance(parameter, DTensor) else parameter
        held, whole = held + local.numel(), whole + parameter.numel()
    return held, whole


def main(case_file: str, out_file: str) -> None:
    case = json.loads(Path(case_file).read_text())
    config, shard = case["config"], load_shard(Path(case["shard"]))
    dist.init_process_group("gloo")
    data_parallel = DataParallel(dist.get_rank(), dist.get_world_size())
    saved = {}
    for mode in ("ddp", "fsdp"):
        model, tokenizer = fresh_adapter(config)
        spec = TrainSpec.from_config({**config, "train.distributed": mode, "train.grad-accum": case["grad_accum"]})
        if mode == "fsdp":
            shard_base_weights(model, model.device, data_parallel.world_size)
        held_before = base_weights_held(model)
        examples = LazyExamples(tokenizer, shard.train, spec.max_length, str(config["model.system-prompt"]))
        result = train_local(
            model, examples, spec, tokenizer.pad_token_id, case["seed"], Accelerator(cpu=True), data_parallel
        )
        held = [None] * data_parallel.world_size
        dist.all_gather_object(held, (*held_before, *base_weights_held(model)))  # sharded before and after
        for name, array in as_arrays(model, config).items():
            saved[f"{mode}/{name}"] = array
        saved[f"{mode}:loss"], saved[f"{mode}:tokens"] = np.array(result.loss), np.array(result.tokens)
        saved[f"{mode}:held"] = np.array(held)
    if data_parallel.rank == 0:
        np.savez(out_file, **saved)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
