"""mlx-compact: Qwen-VL models on MLX with compact visual tokens and a fixed-size KV cache.

    model, processor = mlx_compact.load(path_or_repo)
    result = mlx_compact.generate(model, processor, "What is this?", images=["photo.jpg"])
"""

from . import _blas  # noqa: F401  (must run before mlx.core is imported)

__version__ = "0.1.0"

from .generate import GenerationResult, generate, stream_generate  # noqa: E402
from .loader import load  # noqa: E402

__all__ = ["load", "generate", "stream_generate", "GenerationResult", "__version__"]
