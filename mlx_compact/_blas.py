"""Use the system's OpenBLAS for MLX's CPU backend on Linux, when it is installed.

The Linux MLX wheel ships a slow reference BLAS. Loading OpenBLAS globally before
`mlx.core` is imported makes float32 matmuls on the CPU backend much faster with the
same results. Set ``MLX_COMPACT_BLAS=bundled`` to keep the wheel's own BLAS.
"""

import ctypes
import ctypes.util
import os
import sys

_CANDIDATES = (
    "libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
)

BLAS = "metal/accelerate" if sys.platform == "darwin" else "bundled reference BLAS"


def preload() -> str:
    """Load OpenBLAS with RTLD_GLOBAL if possible; return a name for the BLAS in use."""
    global BLAS
    if sys.platform != "linux" or os.environ.get("MLX_COMPACT_BLAS") == "bundled":
        return BLAS
    if "mlx.core" in sys.modules and BLAS.startswith("bundled"):
        BLAS = "unknown (mlx was imported before mlx_compact)"
    names = list(_CANDIDATES)
    found = ctypes.util.find_library("openblas")
    if found:
        names.insert(0, found)
    for name in names:
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        BLAS = f"OpenBLAS ({name})"
        break
    return BLAS


preload()
