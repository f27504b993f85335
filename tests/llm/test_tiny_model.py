"""model.tiny: the checkpoint's tokenizer on a small, seeded random network of the same family."""

import torch

from chemfl.config import resolve
from chemfl.llm.model import TINY_SHAPE, ModelSpec, load_base_model
from tests.tiny import save_tiny_llama


def test_tiny_keeps_the_tokenizer_and_shrinks_the_network_identically_every_time(tmp_path):
    folder = save_tiny_llama(tmp_path / "model")
    spec = ModelSpec.from_config(resolve({"model.name": folder, "model.gguf-file": "", "model.tiny": True}))
    first, tokenizer = load_base_model(spec, torch.device("cpu"))
    second, _ = load_base_model(spec, torch.device("cpu"))
    assert first.config.num_hidden_layers == TINY_SHAPE["num_hidden_layers"]
    assert first.config.hidden_size == TINY_SHAPE["hidden_size"]
    assert first.config.vocab_size == len(tokenizer)
    assert all(
        torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=False)
    )
    full, _ = load_base_model(
        ModelSpec.from_config(resolve({"model.name": folder, "model.gguf-file": ""})), torch.device("cpu")
    )
    assert full.config.hidden_size != first.config.hidden_size
