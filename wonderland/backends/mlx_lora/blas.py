"""OpenBLAS for MLX on Linux CPU.

The ``mlx-cpu`` wheel links a reference BLAS (~3-5 GFLOP/s matmuls). Loading Debian's OpenBLAS
into the global symbol scope *before* ``mlx.core`` is imported makes libmlx resolve
``cblas_sgemm`` to it (~20x faster matmuls, measured), with no ``LD_PRELOAD`` or re-exec needed.
The package's ``__init__`` imports this module first, so every module of the MLX backend gets it.
"""

from __future__ import annotations

import ctypes
import os
import sys

OPENBLAS_LIBS = ("libopenblas.so.0", "libopenblasp.so.0")  # Debian: libopenblas0-pthread


def _preload_openblas() -> str | None:
    """Put OpenBLAS first in the global symbol scope so libmlx binds cblas_* to it.

    Must run before ``mlx.core`` is first imported (a library's symbols are bound when it loads).
    Returns the library used, or None (not Linux, not installed, or mlx already loaded).
    """
    if not sys.platform.startswith("linux") or "mlx.core" in sys.modules or os.environ.get("WONDERLAND_MLX_BLAS") == "bundled":
        return None
    for name in OPENBLAS_LIBS:
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            return name
        except OSError:
            continue
    print("wonderland: MLX on Linux CPU is ~10x slower without OpenBLAS; install it with "
          "`sudo apt-get install libopenblas0-pthread`", file=sys.stderr)
    return None


BLAS = _preload_openblas()
