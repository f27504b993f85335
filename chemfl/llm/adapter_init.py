"""The initial adapter from the model's config and the LoRA seed alone, without the base weights.

A ServerApp that only aggregates needs the adapter's tensors, not the base model: for a 7B model
that is ~160 MB of LoRA tensors instead of ~28 GB of fp32 weights. The base architecture is built
on the meta device (accelerate's `init_empty_weights`: no memory), and each targeted linear layer
gets a stand-in weight that is a single float broadcast to the layer's shape (4 bytes, stride 0).
peft then attaches and initialises the adapter exactly as `chemfl.llm.lora.attach_lora` does on the
real model, from the same seed, so the result is bit-identical to loading the model first (a test
compares them), whatever peft's initialisation scheme is.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from chemfl.llm.lora import attach_lora, exchanged_state, frozen_a_digest
from chemfl.llm.model import TINY_SHAPE, LoraSpec, ModelSpec, materialized_location, resolve_model_path


def model_config(spec: ModelSpec):
    """The checkpoint's transformers config (from config.json, or a GGUF file's header)."""
    from transformers import AutoConfig

    location, gguf = resolve_model_path(spec)
    cached = materialized_location(location, gguf, spec.cache_dir) if gguf else None
    if cached is not None:
        config = AutoConfig.from_pretrained(str(cached))
    elif gguf:
        config = AutoConfig.from_pretrained(location, gguf_file=gguf)
    else:
        config = AutoConfig.from_pretrained(location)
    if spec.tiny:
        for name, value in TINY_SHAPE.items():
            setattr(config, name, value)
    return config


def _stand_in_weights(model, dtype: torch.dtype) -> None:
    """Every linear layer on the meta device gets a broadcast scalar weight of its shape: peft
    creates and initialises the adapter on the CPU beside it, and nothing is allocated."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.is_meta:
            scalar = torch.zeros(1, dtype=dtype)
            stand_in = scalar.expand(module.out_features, module.in_features)
            module.weight = torch.nn.Parameter(stand_in, requires_grad=False)
            if module.bias is not None and module.bias.is_meta:
                module.bias = torch.nn.Parameter(scalar.expand(module.out_features), requires_grad=False)


def adapter_skeleton(model_spec: ModelSpec, lora_spec: LoraSpec):
    """The peft model with real, seeded LoRA tensors around a weightless base: enough to build the
    initial adapter, take received adapters in and save them in PEFT's format."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(model_config(model_spec))
    _stand_in_weights(skeleton, torch.float32)
    # Quantized layers only change how the base weights are stored: the adapter is the same.
    return attach_lora(skeleton, lora_spec, quantized=False)


def initial_adapter(model_spec: ModelSpec, lora_spec: LoraSpec) -> tuple[OrderedDict[str, torch.Tensor], str | None]:
    """(the exchanged initial adapter, fp32 on CPU; the FFA-LoRA A digest or None), as the
    ServerApp would get them from the loaded model, without loading it."""
    peft_model = adapter_skeleton(model_spec, lora_spec)
    digest = frozen_a_digest(peft_model) if lora_spec.freeze_a else None
    return exchanged_state(peft_model, lora_spec), digest
