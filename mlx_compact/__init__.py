"""mlx-compact: Qwen-VL vision-language models on MLX with compact visual tokens."""

from . import _blas  # noqa: F401  (must run before mlx.core is imported)

__version__ = "0.1.0"
