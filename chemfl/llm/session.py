"""One loaded base model + adapter per process, reused across messages.

Simulation runs ClientApps in persistent Ray actors, so a module-level cache keeps the base model
in memory between rounds: it is loaded once per (model, LoRA) configuration, never per round.
"""

from __future__ import annotations

import logging
import time
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


_SESSIONS: dict[tuple[ModelSpec, LoraSpec, torch.device], ModelSession] = {}
logger = logging.getLogger(__name__)


def get_session(config: dict[str, Scalar], device: torch.device | None = None) -> ModelSession:
    """The process's model session for `config`, loaded on first use. `device`: where to load it
    (default pick_device(); the facility trainer passes each rank's own GPU). Every load is logged
    once, so a log shows how often a process loaded its model."""
    from accelerate import Accelerator

    model_spec, lora_spec = ModelSpec.from_config(config), LoraSpec.from_config(config)
    device = device if device is not None else pick_device()
    key = (model_spec, lora_spec, device)
    if key not in _SESSIONS:
        started = time.perf_counter()
        base, tokenizer = load_base_model(model_spec, device)
        model = attach_lora(base, lora_spec, quantized=model_spec.quantization != "none")
        accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="no" if device.type == "cpu" else "bf16")
        _SESSIONS.clear()  # one model per process: a new configuration replaces the old one
        _SESSIONS[key] = ModelSession(model, tokenizer, device, accelerator, model_spec, lora_spec)
        logger.info("model loaded: %s on %s in %.1f s", model_spec.name, device, time.perf_counter() - started)
    return _SESSIONS[key]
