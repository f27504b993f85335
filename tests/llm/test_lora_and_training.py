import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from chemfl.data_prep.formatting import tokenize_examples
from chemfl.errors import ChemFLError
from chemfl.llm.lora import (
    adapter_layout,
    attach_lora,
    exchanged_state,
    frozen_a_digest,
    load_exchanged_state,
    load_packed_state,
    packed_state,
)
from chemfl.llm.model import LoraSpec, ModelSpec, load_base_model
from chemfl.llm.session import get_session
from chemfl.llm.training import TrainSpec, collate, train_local

RECORDS = [
    {"input": "What is the formula of <SMILES> CCO </SMILES> ?", "output": "<MOLFORMULA> C2H6O </MOLFORMULA>"},
    {"input": "Name <SMILES> CCO </SMILES> .", "output": "<IUPAC> ethanol </IUPAC>"},
]


def fresh_model(config):
    model_spec, lora_spec = ModelSpec.from_config(config), LoraSpec.from_config(config)
    base, tokenizer = load_base_model(model_spec, torch.device("cpu"))
    return attach_lora(base, lora_spec, quantized=model_spec.quantization != "none"), tokenizer, lora_spec


def batch_loss(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).loss.item()


def test_local_training_lowers_loss_on_a_fixed_batch(tiny_config):
    config = tiny_config({"train.local-steps": 5})
    session = get_session(config)
    examples, _ = tokenize_examples(session.tokenizer, RECORDS, 96)
    batch = collate(examples, session.tokenizer.pad_token_id)
    before = batch_loss(session.model, batch)
    result = train_local(
        session.model,
        examples,
        TrainSpec.from_config(config),
        session.tokenizer.pad_token_id,
        seed=0,
        accelerator=session.accelerator,
    )
    after = batch_loss(session.model, batch)
    assert after < before
    assert result.steps == 5 and result.tokens > 0 and result.tokens_per_second > 0


@pytest.mark.usefixtures("server_task_identity")
def test_adapter_round_trips_through_the_packed_message_exactly(tiny_config):
    config = tiny_config()
    model, _, spec = fresh_model(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_()
    sent = exchanged_state(model, spec)
    packed = packed_state(model, spec)
    record = ArrayRecord({name: Array(value) for name, value in packed.items()})
    received = {name: array.numpy() for name, array in record.items()}
    other, _, _ = fresh_model(config)
    load_packed_state(other, spec, received, adapter_layout(model, spec).digest)
    back = exchanged_state(other, spec)
    assert list(back) == list(sent)
    assert all(torch.equal(back[key], sent[key]) for key in sent)
    assert all(tensor.dtype == torch.float32 for tensor in back.values())
    # One array instead of one per tensor: Flower sends each object of a message with its own RPC.
    per_tensor = Message(RecordDict({"arrays": ArrayRecord(sent)}), dst_node_id=1, message_type="train")
    one_vector = Message(RecordDict({"arrays": record}), dst_node_id=1, message_type="train")
    assert len(get_all_nested_objects(per_tensor)) >= 2 * len(sent)
    assert len(get_all_nested_objects(one_vector)) <= 5


def test_a_packed_adapter_of_another_layout_is_refused(tiny_config):
    model, _, spec = fresh_model(tiny_config())
    frozen, _, frozen_spec = fresh_model(tiny_config({"lora.freeze-a": True}))
    with pytest.raises(ChemFLError, match="layout differs"):
        load_packed_state(frozen, frozen_spec, packed_state(model, spec), adapter_layout(model, spec).digest)
    with pytest.raises(ChemFLError, match="values in shape"):  # without the digest the size still guards
        load_packed_state(frozen, frozen_spec, packed_state(model, spec), None)
    with pytest.raises(ChemFLError, match="expected the packed adapter"):
        load_packed_state(model, spec, {name: t.numpy() for name, t in exchanged_state(model, spec).items()}, None)


def test_nodes_and_server_start_from_the_same_seeded_adapter(tiny_config):
    first, _, spec = fresh_model(tiny_config())
    second, _, _ = fresh_model(tiny_config())
    a, b = exchanged_state(first, spec), exchanged_state(second, spec)
    assert all(torch.equal(a[key], b[key]) for key in a)
    third, _, spec3 = fresh_model(tiny_config({"lora.seed": 1}))
    c = exchanged_state(third, spec3)
    assert any(not torch.equal(a[key], c[key]) for key in a if "lora_A" in key)


def test_ffa_lora_keeps_a_fixed_and_sends_only_b(tiny_config):
    config = tiny_config({"lora.freeze-a": True, "train.local-steps": 3})
    model, tokenizer, spec = fresh_model(config)
    full = exchanged_state(*fresh_model(tiny_config())[::2])
    a_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    b_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    digest = frozen_a_digest(model)
    examples, _ = tokenize_examples(tokenizer, RECORDS, 96)
    from accelerate import Accelerator

    train_local(model, examples, TrainSpec.from_config(config), tokenizer.pad_token_id, 0, Accelerator(cpu=True))
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], a_before[n]) for n in a_before)
    assert any(not torch.equal(after[n], b_before[n]) for n in b_before)
    assert frozen_a_digest(model) == digest
    sent = exchanged_state(model, spec)
    assert sent and all(".lora_B." in key for key in sent)
    assert sum(t.numel() for t in sent.values()) < sum(t.numel() for t in full.values())


def test_received_adapter_must_fit(tiny_config):
    model, _, spec = fresh_model(tiny_config())
    state = exchanged_state(model, spec)
    state.popitem()
    with pytest.raises(ChemFLError, match="does not fit"):
        load_exchanged_state(model, spec, state)


def test_unknown_lora_target_modules_is_a_clear_error(tiny_config):
    with pytest.raises(ChemFLError, match="not in this model.*q_proj"):
        fresh_model(tiny_config({"lora.target-modules": "attn_qkv"}))


def test_four_bit_qlora_path_trains_on_cpu(tiny_config):
    config = tiny_config({"model.quantization": "4bit", "train.local-steps": 2})
    model, tokenizer, _ = fresh_model(config)
    quantized = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert quantized, "4-bit path did not quantize any layer"
    examples, _ = tokenize_examples(tokenizer, RECORDS, 96)
    from accelerate import Accelerator

    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    result = train_local(
        model, examples, TrainSpec.from_config(config), tokenizer.pad_token_id, 0, Accelerator(cpu=True)
    )
    assert result.steps == 2
    assert any(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if n in lora_before)


def test_answer_token_loss_equals_the_models_own_loss(tiny_config):
    from chemfl.llm.training import answer_token_loss

    session = get_session(tiny_config())
    examples, _ = tokenize_examples(session.tokenizer, RECORDS, 96)
    batch = collate(examples, session.tokenizer.pad_token_id)
    session.model.eval()
    with torch.no_grad():
        loss_sum, count = answer_token_loss(session.model, batch)
        expected = session.model(**batch).loss
    assert count == sum(label != -100 for e in examples for label in e["labels"][1:])
    assert (loss_sum / count).item() == pytest.approx(expected.item(), rel=1e-5)
