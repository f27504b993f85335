"""One loaded base model + adapter per process, reused across messages.

Simulation runs ClientApps in persistent Ray actors, so a module-level cache keeps the base model
in memory between rounds: it is loaded once per (model, LoRA) configuration, never per round.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chemfl.config import Scalar
from chemfl.llm.lora import attach_lora
from chemfl.llm.model import LoraSpec, ModelSpec, load_base_model, pick_device


@dataclass
class ModelSession:
    model: object  # peft model
    tokenizer: object
    device: torch.device
    accelerator: object
    model_spec: ModelSpec
    lora_spec: LoraSpec


_SESSIONS: dict[tuple[ModelSpec, LoraSpec], ModelSession] = {}


def get_session(config: dict[str, Scalar]) -> ModelSession:
    from accelerate import Accelerator

    model_spec, lora_spec = ModelSpec.from_config(config), LoraSpec.from_config(config)
    key = (model_spec, lora_spec)
    if key not in _SESSIONS:
        device = pick_device()
        base, tokenizer = load_base_model(model_spec, device)
        model = attach_lora(base, lora_spec, quantized=model_spec.quantization != "none")
        accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="no" if device.type == "cpu" else "bf16")
        _SESSIONS.clear()  # one model per process: a new configuration replaces the old one
        _SESSIONS[key] = ModelSession(model, tokenizer, device, accelerator, model_spec, lora_spec)
    return _SESSIONS[key]
