"""A real two-rank trainer (torchrun, gloo): requests through the channel, the model loaded once per
rank, data-parallel training equal to one process, refusals that keep it serving, clean shutdown."""

from __future__ import annotations

import time

import numpy as np
import pytest
from accelerate import Accelerator

from chemfl.data_prep.formatting import LazyExamples
from chemfl.data_prep.shards import load_shard
from chemfl.llm.lora import adapter_layout, frozen_a_digest
from chemfl.llm.model import LoraSpec
from chemfl.llm.training import TrainSpec, batch_order_seed, train_local
from chemfl.protocol import EvalReport, TrainReport
from chemfl.trainer.channel import TrainerError
from tests.trainer.harness import TrainerProcess, as_arrays, fresh_adapter, max_difference

DDP_BOUND = 1e-5


@pytest.fixture(scope="module")
def trainer(trainer_setup, tmp_path_factory):
    process = TrainerProcess(
        trainer_setup, tmp_path_factory.mktemp("served"), extra=("--job-end-time", str(time.time() + 3600))
    )
    process.wait_ready()
    yield process
    process.kill()


def test_two_ranks_train_as_one_process_with_their_joint_batch(trainer, trainer_setup):
    config = trainer_setup.config
    model, tokenizer = fresh_adapter(config)
    sent = as_arrays(model, config)
    reply = trainer.client().request("train", {"server-round": 1}, config, sent)

    assert reply.facility == "polaris"
    assert set(reply.metrics) == set(TrainReport.KEYS.values()) and reply.metrics["steps"] == 3
    assert list(reply.arrays) == list(sent) and all(a.dtype == np.float32 for a in reply.arrays.values())
    # One process, batch 2 x 2 ranks, the same seed and examples: the same adapter.
    shard = load_shard(trainer_setup.shard)
    spec = TrainSpec.from_config(config)
    examples = LazyExamples(tokenizer, shard.train, spec.max_length, str(config["model.system-prompt"]))
    alone = TrainSpec.from_config({**config, "train.batch-size": 2 * spec.batch_size})
    seed = batch_order_seed(spec.seed, 1, shard.partition_id)
    result = train_local(model, examples, alone, tokenizer.pad_token_id, seed, Accelerator(cpu=True))
    difference = max_difference(reply.arrays, as_arrays(model, config))
    print(f"trainer (2 ranks x batch 2) vs one process (batch 4): max abs difference {difference:.2e}")
    assert difference < DDP_BOUND
    assert max_difference(reply.arrays, sent) > 100 * DDP_BOUND  # it did train
    assert reply.metrics["train-loss"] == pytest.approx(result.loss, rel=1e-5)
    assert reply.metrics["num-examples"] == len(shard.train)
    # Throughput counts every rank's tokens: the same tokens one process trains on.
    assert reply.metrics["tokens-per-second"] * reply.metrics["seconds"] == pytest.approx(result.tokens)


def test_a_request_with_other_knobs_is_refused_and_the_trainer_keeps_serving(trainer, trainer_setup):
    config = trainer_setup.config
    sent = as_arrays(fresh_adapter(config)[0], config)
    with pytest.raises(TrainerError, match=r"refused: .*train\.lr \(trainer 0\.01, request 0\.02\)"):
        trainer.client().request("train", {"server-round": 1}, {**config, "train.lr": 0.02}, sent)
    with pytest.raises(TrainerError, match="LoRA layout needs"):
        trainer.client().request("train", {"server-round": 1}, config, {"adapter": sent["adapter"][1:]})
    with pytest.raises(TrainerError, match="layout differs"):
        trainer.client().request("train", {"server-round": 1, "adapter-layout": "0" * 16}, config, sent)
    assert trainer.client().facility() == "polaris"


def test_a_task_longer_than_the_walltime_left_is_refused_before_it_starts(trainer, trainer_setup):
    config = trainer_setup.config
    sent = as_arrays(fresh_adapter(config)[0], config)
    trainer.client().request("train", {"server-round": 2, "local-steps": 2}, config, sent)  # measures a step
    with pytest.raises(TrainerError, match="walltime left"):
        trainer.client().request("train", {"server-round": 3, "local-steps": 10**8}, config, sent)


def test_the_model_is_loaded_once_per_rank_across_requests(trainer, trainer_setup):
    config = trainer_setup.config
    client = trainer.client()
    first = client.request("train", {"server-round": 4}, config, as_arrays(fresh_adapter(config)[0], config))
    second = client.request("train", {"server-round": 5, "local-steps": 2}, config, first.arrays)
    evaluated = client.request("evaluate", {"server-round": 5}, config, second.arrays)
    assert second.metrics["steps"] == 2
    assert set(evaluated.metrics) == {EvalReport.KEYS["num_examples"], EvalReport.KEYS["eval_loss"]}
    assert evaluated.metrics["eval-loss"] > 0 and evaluated.arrays == {}
    assert [trainer.count(rf"rank {rank}/2 chemfl.llm.session INFO: model loaded") for rank in (0, 1)] == [1, 1]


def test_shutdown_ends_every_rank_with_status_zero(trainer):
    assert trainer.client().request("shutdown").facility == "polaris"
    assert trainer.exit_code(timeout=30) == 0
    assert not trainer.socket.exists()


def test_one_rank_with_ffa_lora_on_a_slice_checks_the_frozen_a_and_evaluates_on_the_test_set(trainer_setup, tmp_path):
    trainer = TrainerProcess(
        trainer_setup, tmp_path, ranks=1, extra=("--set", "lora.freeze-a=true", "--data-slice", "1/2")
    )
    try:
        trainer.wait_ready()
        config = {**trainer_setup.config, "lora.freeze-a": True}
        model, _ = fresh_adapter(config)
        sent = as_arrays(model, config)
        client = trainer.client()
        with pytest.raises(TrainerError, match="frozen LoRA A differs from the server's"):
            client.request("train", {"server-round": 1, "lora-a-digest": "0" * 64}, config, sent)
        task = {"server-round": 1, "lora-a-digest": frozen_a_digest(model)}
        reply = client.request("train", task, config, sent)
        layout = adapter_layout(model, LoraSpec.from_config(config))
        assert list(reply.arrays) == list(sent) and all(".lora_B." in name for name in layout.names)
        assert reply.arrays["adapter"].shape == (layout.size,)
        assert reply.metrics["num-examples"] == len(load_shard(trainer_setup.shard).train[1::2])
        evaluated = client.request("evaluate", {**task, "evaluate-on": "test"}, config, reply.arrays)
        assert evaluated.evaluation["n_loss"] == evaluated.metrics["num-examples"] > 0
        assert evaluated.evaluation["loss"] == evaluated.metrics["eval-loss"]
        client.request("shutdown")
        assert trainer.exit_code(timeout=30) == 0
    finally:
        trainer.kill()
