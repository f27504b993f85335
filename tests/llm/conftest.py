import pytest

from chemfl.config import resolve
from tests.tiny import save_tiny_llama


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def tiny_config(tiny_model_dir, tmp_path):
    def make(overrides: dict | None = None):
        values = {
            "model.name": tiny_model_dir,
            "model.gguf-file": "",
            "model.cache-dir": str(tmp_path / "cache"),
            "lora.r": 4,
            "lora.alpha": 8,
            "lora.dropout": 0.0,
            "train.batch-size": 2,
            "train.max-length": 96,
            "train.lr": 0.01,
        }
        values.update(overrides or {})
        return resolve(values)

    return make
