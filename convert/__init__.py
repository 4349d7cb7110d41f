"""Hugging Face Qwen-VL checkpoints -> MLX directories (also `mlx-compact convert`)."""

from .convert import ConvertError, convert

__all__ = ["convert", "ConvertError"]
