"""The fast training path of the PyTorch backend: ``training`` (its levers, packing and loss),
``fused_lora`` (hand-written LoRA decoder layers), ``fused_ops`` (their pointwise ops and attention),
``triton_kernels`` (CUDA kernels of those ops), ``fused_ce`` (linear cross-entropy without logits)."""
