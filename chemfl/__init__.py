"""ChemFL: federated LoRA fine-tuning of chemistry LLMs across supercomputers, built on Flower."""

__version__ = "0.1.0"
