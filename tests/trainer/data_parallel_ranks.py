"""Run by torchrun from test_data_parallel.py: every rank trains its block of each global batch
(chemfl.llm.training.DataParallel, gloo); rank 0 saves the adapter and the reported loss and tokens.

    torchrun --standalone --nproc-per-node 2 tests/trainer/data_parallel_ranks.py CASE.json OUT.npz
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch.distributed as dist
from accelerate import Accelerator

from chemfl.data_prep.formatting import LazyExamples
from chemfl.data_prep.shards import load_shard
from chemfl.llm.training import DataParallel, TrainSpec, train_local
from tests.trainer.harness import as_arrays, fresh_adapter


def main(case_file: str, out_file: str) -> None:
    case = json.loads(Path(case_file).read_text())
    config, shard = case["config"], load_shard(Path(case["shard"]))
    dist.init_process_group("gloo")
    data_parallel = DataParallel(dist.get_rank(), dist.get_world_size())
    saved = {}
    for grad_accum in case["grad_accum"]:
        model, tokenizer = fresh_adapter(config)
        spec = TrainSpec.from_config({**config, "train.grad-accum": grad_accum})
        examples = LazyExamples(tokenizer, shard.train, spec.max_length, str(config["model.system-prompt"]))
        result = train_local(
            model, examples, spec, tokenizer.pad_token_id, case["seed"], Accelerator(cpu=True), data_parallel
        )
        for name, array in as_arrays(model, config).items():
            saved[f"{grad_accum}/{name}"] = array
        saved[f"{grad_accum}:loss"], saved[f"{grad_accum}:tokens"] = np.array(result.loss), np.array(result.tokens)
    if data_parallel.rank == 0:
        np.savez(out_file, **saved)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
