"""Dense and Mixture-of-Experts transformers in plain PyTorch, trained with PyTorch Lightning."""

from moe.config import ModelConfig
from moe.model import ModelOutput, Transformer, build_model
from moe.presets import PRESETS, get_preset, preset_names

__all__ = ["PRESETS", "ModelConfig", "ModelOutput", "Transformer", "build_model", "get_preset", "preset_names"]
