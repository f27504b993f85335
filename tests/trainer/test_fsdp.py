"""train.distributed = "fsdp": two ranks (torchrun, gloo) holding half the base weights each end with
the adapter two ranks holding the whole model (DDP) end with, on the same examples and seed; and the
knob's bad values are clear errors when the config is checked."""

from __future__ import annotations

import pytest
from accelerate import Accelerator

from chemfl.config import resolve
from chemfl.data_prep.formatting import LazyExamples
from chemfl.data_prep.shards import load_shard
from chemfl.errors import ChemFLError
from chemfl.llm.training import TrainSpec, batch_order_seed, train_local
from chemfl.trainer.channel import TrainerError
from chemfl.trainer.ranks import RankEnv
from chemfl.trainer.service import TrainerSettings, run_trainer
from tests.trainer.harness import TrainerProcess, as_arrays, fresh_adapter, max_difference, run_two_ranks

FSDP_BOUND = 1e-5
SEED = 7


def train_both_ways(setup, folder) -> dict[str, dict]:
    """{"ddp" | "fsdp": {"arrays", "loss", "tokens", "held"}} from tests/trainer/fsdp_ranks.py."""
    case = {"config": setup.config, "shard": str(setup.shard), "seed": SEED, "grad_accum": 2}
    saved = run_two_ranks("fsdp_ranks.py", case, folder)
    return {
        mode: {
            "arrays": {key.split("/", 1)[1]: saved[key] for key in saved.files if key.startswith(f"{mode}/")},
            "loss": float(saved[f"{mode}:loss"]),
            "tokens": int(saved[f"{mode}:tokens"]),
            "held": [tuple(int(n) for n in row) for row in saved[f"{mode}:held"]],  # per rank, see fsdp_ranks.py
        }
        for mode in ("ddp", "fsdp")
    }


def test_fsdp_on_two_ranks_trains_as_ddp_with_half_the_base_weights_each(trainer_setup, tmp_path):
    trained = train_both_ways(trainer_setup, tmp_path)
    ddp, fsdp = trained["ddp"], trained["fsdp"]
    difference = max_difference(fsdp["arrays"], ddp["arrays"])
    print(
        f"max abs difference, fsdp vs ddp on 2 ranks (grad_accum 2): {difference:.2e}; "
        f"base weights held: {fsdp['held']}"
    )
    assert difference < FSDP_BOUND
    assert fsdp["loss"] == pytest.approx(ddp["loss"], rel=1e-5)
    assert fsdp["tokens"] == ddp["tokens"]

    # Each rank's (held, whole) base-weight elements before training, then after it.
    whole = ddp["held"][0][1]
    assert ddp["held"] == [(whole, whole, whole, whole)] * 2  # DDP: every rank holds the whole model
    for held in (0, 2):  # FSDP: the ranks' shards make the model once, half each
        assert all(row[held + 1] == whole for row in fsdp["held"])
        assert sum(row[held] for row in fsdp["held"]) == whole
        assert all(0.45 * whole <= row[held] <= 0.55 * whole for row in fsdp["held"])

    # The comparison can tell: training moved the adapter far from where it started.
    model, _ = fresh_adapter(trainer_setup.config)
    assert max_difference(fsdp["arrays"], as_arrays(model, trainer_setup.config)) > 100 * FSDP_BOUND


def test_a_trainer_sharding_its_base_model_trains_as_one_process_and_refuses_to_evaluate(trainer_setup, tmp_path):
    trainer = TrainerProcess(trainer_setup, tmp_path, extra=("--set", "train.distributed=fsdp"))
    try:
        trainer.wait_ready()
        for rank in (0, 1):  # each rank's line, however late its stream is read
            trainer.wait_for(rf"rank {rank}/2 chemfl.trainer INFO: base weights sharded over 2 ranks", timeout=30)
        config = {**trainer_setup.config, "train.distributed": "fsdp"}
        model, tokenizer = fresh_adapter(config)
        sent = as_arrays(model, config)
        client = trainer.client()
        first = client.request("train", {"server-round": 1}, config, sent)
        second = client.request("train", {"server-round": 2, "local-steps": 2}, config, first.arrays)

        # One process, batch 2 x 2 ranks, the same seeds and examples, whole model: the same adapters.
        shard = load_shard(trainer_setup.shard)
        spec = TrainSpec.from_config(config)
        examples = LazyExamples(tokenizer, shard.train, spec.max_length, str(config["model.system-prompt"]))
        alone = TrainSpec.from_config({**trainer_setup.config, "train.batch-size": 2 * spec.batch_size})
        differences = []
        for server_round, steps, reply in ((1, 3, first), (2, 2, second)):
            seed = batch_order_seed(spec.seed, server_round, shard.partition_id)
            result = train_local(
                model, examples, alone.for_task(steps, None), tokenizer.pad_token_id, seed, Accelerator(cpu=True)
            )
            differences.append(max_difference(reply.arrays, as_arrays(model, config)))
            assert reply.metrics["train-loss"] == pytest.approx(result.loss, rel=1e-5)
        print(f"fsdp trainer (2 ranks x batch 2) vs one process (batch 4): max abs differences {differences}")
        assert max(differences) < FSDP_BOUND
        assert max_difference(first.arrays, sent) > 100 * FSDP_BOUND  # it did train

        with pytest.raises(TrainerError, match=r"refused: .*train.distributed = 'fsdp'"):
            client.request("evaluate", {"server-round": 2}, config, second.arrays)
        client.request("shutdown")
        assert trainer.exit_code(timeout=30) == 0
    finally:
        trainer.kill()


def test_fsdp_with_quantization_or_an_unknown_mode_is_a_clear_error():
    with pytest.raises(ChemFLError, match=r"train.distributed = 'fsdp'.*model.quantization = '4bit'"):
        TrainSpec.from_config(resolve({"train.distributed": "fsdp", "model.quantization": "4bit"}))
    with pytest.raises(ChemFLError, match=r"train.distributed = 'zero3'; use one of ddp, fsdp"):
        TrainSpec.from_config(resolve({"train.distributed": "zero3"}))
    assert TrainSpec.from_config(resolve({"train.distributed": "fsdp"})).distributed == "fsdp"
    assert TrainSpec.from_config(resolve({})).distributed == "ddp"


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_trainer_started_with_fsdp_and_qlora_stops_before_joining_its_group(tmp_path, ranks):
    config = resolve({"train.distributed": "fsdp", "model.quantization": "4bit"})
    settings = TrainerSettings(config, tmp_path, None, tmp_path / "s.sock", b"", "gloo", None, 60.0)
    with pytest.raises(ChemFLError, match=r"train.distributed = 'fsdp'.*model.quantization = '4bit'.*set"):
        run_trainer(settings, RankEnv(0, ranks, 0, "127.0.0.1", 29500, "torchrun"), started=0.0)
