"""mlx-compact: Qwen-VL models on MLX with compact visual tokens and a fixed-size KV cache.

model, processor = mlx_compact.load(path_or_repo)
result = mlx_compact.generate(model, processor, "What is this?", images=["photo.jpg"],
                              compaction=mlx_compact.Compaction(keep=0.33))
chat = mlx_compact.ChatSession(model, processor, max_kv_tokens=4096)
"""

from . import _blas  # noqa: F401  (must run before mlx.core is imported)

__version__ = "0.1.0"

from .chat import ChatSession  # noqa: E402
from .compaction import Compaction  # noqa: E402
from .generate import GenerationResponse, GenerationResult, PromptCache, generate, make_prompt_cache, stream_generate  # noqa: E402
from .loader import load  # noqa: E402
from .memory import MemoryPlanError, plan  # noqa: E402
from .video import load_video  # noqa: E402

__all__ = [
    "load",
    "generate",
    "stream_generate",
    "make_prompt_cache",
    "PromptCache",
    "GenerationResponse",
    "GenerationResult",
    "ChatSession",
    "Compaction",
    "plan",
    "MemoryPlanError",
    "load_video",
    "__version__",
]
