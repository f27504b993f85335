"""The initial adapter built on a weightless skeleton equals the one built on the loaded model."""

from __future__ import annotations

import pytest
import torch

from chemfl.config import resolve
from chemfl.llm.adapter_init import adapter_skeleton, initial_adapter
from chemfl.llm.lora import exchanged_state, frozen_a_digest
from chemfl.llm.model import LoraSpec, ModelSpec
from chemfl.llm.session import get_session
from tests.tiny import save_tiny_llama


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("adapter-init") / "model")


@pytest.mark.parametrize(
    "lora",
    [
        {"lora.r": 4, "lora.alpha": 8},
        {"lora.r": 4, "lora.alpha": 8, "lora.freeze-a": True, "lora.seed": 5},
        {"lora.r": 2, "lora.target-modules": "q_proj,v_proj,lm_head", "lora.seed": 9},
    ],
    ids=["lora", "ffa-lora", "lm-head"],
)
def test_meta_init_adapter_is_bit_identical_to_the_loaded_models(tiny_model, tmp_path, lora):
    config = resolve({"model.name": tiny_model, "model.gguf-file": "", "model.cache-dir": str(tmp_path), **lora})
    state, digest = initial_adapter(ModelSpec.from_config(config), LoraSpec.from_config(config))
    session = get_session(config)
    loaded = exchanged_state(session.model, session.lora_spec)
    assert list(state) == list(loaded)
    assert all(torch.equal(state[name], loaded[name]) for name in loaded)
    if session.lora_spec.freeze_a:  # only B (zeros) travels: the frozen A is compared by its digest
        assert digest is not None and digest == frozen_a_digest(session.model)
    else:
        assert digest is None and any(bool(t.abs().sum() > 0) for n, t in state.items() if "lora_A" in n)


def test_skeleton_holds_no_base_weights_and_saves_a_peft_adapter(tiny_model, tmp_path):
    from peft import PeftModel

    config = resolve({"model.name": tiny_model, "model.gguf-file": "", "model.cache-dir": str(tmp_path)})
    skeleton = adapter_skeleton(ModelSpec.from_config(config), LoraSpec.from_config(config))
    base_bytes = sum(
        p.untyped_storage().nbytes() for n, p in skeleton.named_parameters() if "lora_" not in n and not p.is_meta
    )
    assert base_bytes <= 4 * sum(1 for n, _ in skeleton.named_parameters() if "lora_" not in n)  # a float each
    skeleton.save_pretrained(str(tmp_path / "adapter"), save_embedding_layers=False)
    session = get_session(config)
    reloaded = PeftModel.from_pretrained(session.model.get_base_model(), str(tmp_path / "adapter"))
    assert exchanged_state(reloaded, session.lora_spec).keys() == exchanged_state(skeleton, session.lora_spec).keys()
