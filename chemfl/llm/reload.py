"""Evaluate a saved adapter the way any HF user would load it: base model + PeftModel.from_pretrained."""

from __future__ import annotations

from pathlib import Path

from chemfl.config import Scalar
from chemfl.data_prep import store
from chemfl.errors import ChemFLError
from chemfl.llm.evaluation import EvalSpec, evaluate
from chemfl.llm.model import ModelSpec, load_base_model, pick_device


def evaluate_saved_adapter(adapter: Path, config: dict[str, Scalar]) -> dict:
    """The centralized evaluation (same records, same spec) of the adapter saved at `adapter`."""
    from peft import PeftModel

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise ChemFLError(f"{adapter} holds no adapter_config.json; point at outputs/<run>/adapter")
    test_file = Path(str(config["data.path"])) / "test.parquet"
    if not test_file.is_file():
        raise ChemFLError(f"no test set at {test_file}; pass the recipe the adapter was trained with")
    base, tokenizer = load_base_model(ModelSpec.from_config(config), pick_device())
    model = PeftModel.from_pretrained(base, str(adapter))
    return evaluate(
        model,
        tokenizer,
        store.read_records(test_file),
        EvalSpec.from_config(config),
        int(config["train.max-length"]),
        str(config["model.system-prompt"]),
    )
