"""LoRA adapters through peft: attach (seeded), read and write the exchanged tensors, save in
PEFT's standard format (adapter_config.json + adapter_model.safetensors).

With `lora.freeze-a` (FFA-LoRA, Sun et al., ICLR 2024) every A matrix stays at its seeded
initialisation on every node and only B is trained and exchanged: the aggregate of B @ A is then
exactly the average of the products, and the payload halves.
"""

from __future__ import annotations

import hashlib
import shutil
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chemfl import files, protocol
from chemfl.errors import ChemFLError
from chemfl.llm.model import LoraSpec
from chemfl.llm.packing import AdapterLayout


def attach_lora(model, spec: LoraSpec, quantized: bool):
    """The peft model around `model`; A and B initialised from `spec.seed` (same on every node)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        bias="none",
        target_modules=spec.target_modules if spec.target_modules == "all-linear" else list(spec.target_modules),
        task_type="CAUSAL_LM",
    )
    if spec.target_modules != "all-linear":
        # peft accepts a list as long as one name matches; every name must, or a typo trains less.
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [name for name in spec.target_modules if name not in present]
        if missing:
            linear = sorted(
                {
                    name.rsplit(".", 1)[-1]
                    for name, module in model.named_modules()
                    if isinstance(module, torch.nn.Linear)
                }
            )
            raise ChemFLError(
                f"lora.target-modules {', '.join(missing)} not in this model; its linear layers are "
                f'{linear} (or use "all-linear")'
            )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        peft_model = get_peft_model(model, config)
    if spec.freeze_a:
        for name, parameter in peft_model.named_parameters():
            if ".lora_A." in name:
                parameter.requires_grad_(False)
    return peft_model


def _adapter_name(name: str) -> str:
    # peft's parameter names carry the adapter name ("...lora_A.default.weight"); exchanged names
    # drop it, as in adapter_model.safetensors.
    return name.replace(".default.", ".")


def lora_parameters(peft_model) -> dict[str, torch.nn.Parameter]:
    """Every LoRA A and B matrix of a peft model (trained or frozen), by peft's parameter name."""
    return {name: p for name, p in peft_model.named_parameters() if ".lora_A." in name or ".lora_B." in name}


def _exchanged_parameters(peft_model, spec: LoraSpec) -> OrderedDict[str, torch.nn.Parameter]:
    """The parameters that travel, by exchanged name: every LoRA A and B, or only B under freeze-a."""
    return OrderedDict(
        (_adapter_name(name), parameter)
        for name, parameter in lora_parameters(peft_model).items()
        if ".lora_B." in name or not spec.freeze_a
    )


def exchanged_state(peft_model, spec: LoraSpec) -> OrderedDict[str, torch.Tensor]:
    """The tensors that travel, fp32 on CPU: every LoRA A and B, or only B under freeze-a."""
    return OrderedDict(
        (name, parameter.detach().to("cpu", torch.float32).clone())
        for name, parameter in _exchanged_parameters(peft_model, spec).items()
    )


def load_exchanged_state(peft_model, spec: LoraSpec, state: dict[str, torch.Tensor]) -> None:
    """Copy received tensors into the adapter; keys and shapes must match exactly."""
    parameters = _exchanged_parameters(peft_model, spec)
    expected = set(parameters)
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ChemFLError(
            f"received adapter does not fit this model: missing {missing[:3]}, unexpected "
            f"{extra[:3]}; server and nodes must share model.name, lora.r, lora.target-modules, lora.freeze-a"
        )
    with torch.no_grad():
        for key, tensor in state.items():
            parameter = parameters[key]
            if tuple(tensor.shape) != tuple(parameter.shape):
                raise ChemFLError(f"received {key} has shape {tuple(tensor.shape)}, expected {tuple(parameter.shape)}")
            parameter.copy_(tensor.to(parameter.device, parameter.dtype))


def adapter_layout(peft_model, spec: LoraSpec) -> AdapterLayout:
    """The layout of this model's exchanged tensors in the packed vector (shapes only: nothing copied)."""
    return AdapterLayout.of(_exchanged_parameters(peft_model, spec))


def packed_state(peft_model, spec: LoraSpec) -> dict[str, np.ndarray]:
    """The adapter as it travels: {protocol.ADAPTER: one float32 vector} (chemfl.llm.packing)."""
    state = exchanged_state(peft_model, spec)
    return {protocol.ADAPTER: AdapterLayout.of(state).pack(state)}


def load_packed_state(peft_model, spec: LoraSpec, packed: Mapping[str, Any], layout_digest: str | None) -> None:
    """Load a received packed adapter; `layout_digest` (the task's) must match this model's layout."""
    if set(packed) != {protocol.ADAPTER}:
        raise ChemFLError(
            f"received arrays {sorted(packed)[:3]}, expected the packed adapter {protocol.ADAPTER!r} alone; "
            "server and nodes must run the same ChemFL version"
        )
    layout = adapter_layout(peft_model, spec)
    if layout_digest is not None and layout_digest != layout.digest:
        raise ChemFLError(
            "received adapter's layout differs from this model's LoRA layout; server and nodes must share "
            "model.name, lora.r, lora.target-modules, lora.freeze-a"
        )
    tensors = layout.unpack(np.array(packed[protocol.ADAPTER], dtype=np.float32))  # a writable copy
    load_exchanged_state(peft_model, spec, {name: torch.from_numpy(value) for name, value in tensors.items()})


def frozen_a_digest(peft_model) -> str:
    """sha256 over every A matrix: nodes check they share the server's frozen A."""
    digest = hashlib.sha256()
    for name, parameter in sorted(peft_model.named_parameters(), key=lambda item: item[0]):
        if ".lora_A." in name:
            digest.update(name.encode())
            digest.update(parameter.detach().to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()


def save_adapter(peft_model, folder: Path) -> Path:
    """PEFT-format adapter at `folder` (written beside it, then renamed into place)."""
    staging = files.staging_dir(Path(folder))
    try:
        # LoRA never changes the base embeddings (even with lm_head as a target): do not copy them.
        peft_model.save_pretrained(str(staging), save_embedding_layers=False)
        files.replace_dir(staging, Path(folder))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Path(folder)
