"""Qwen-VL models in MLX: one file per model_type, shared blocks in vision.py / language.py / base.py."""

import importlib

from .config import MODEL_TYPES, ConfigError, ModelConfig


def model_class(model_type: str):
    """The Model class for a config's model_type."""
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"model_type {model_type!r} is not a supported Qwen-VL model ({', '.join(MODEL_TYPES)})")
    return importlib.import_module(f".{model_type}", __name__).Model


def build_model(config: dict):
    """Instantiate the model for a raw config.json dict (any dialect)."""
    cfg = ModelConfig.from_dict(config)
    return model_class(cfg.model_type)(cfg)
