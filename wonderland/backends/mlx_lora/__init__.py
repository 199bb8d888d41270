"""The MLX backend (mlx-lm): ``backend`` (training, loading), ``chat`` (generation), ``batching``
(batches and loss), ``blas`` (OpenBLAS on Linux CPU, loaded here before any module imports mlx)."""

from wonderland.backends.mlx_lora.blas import BLAS  # noqa: F401  (must run before mlx.core loads)
