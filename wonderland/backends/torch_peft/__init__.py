"""The PyTorch + PEFT backend: ``backend`` (training, loading), ``chat`` (generation),
``batching`` (batches and loss, shared by both paths), ``distributed`` (torchrun + DDP),
``adapters`` (MLX <-> PEFT conversion) and ``fast/`` (the fast training path: fused LoRA layers,
their ops and Triton kernels, the fused cross-entropy)."""
