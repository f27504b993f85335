"""The model side shared by both apps: base model loading, LoRA, local training, evaluation.

The ServerApp loads the same base model and adapter for centralized evaluation, so this code
lives in one room that the ClientApp and ServerApp both call; they stay thin Flower glue.
"""
