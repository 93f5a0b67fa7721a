"""Attention backends for the DiT, chosen by name through a registry with declared capabilities.

- ``registry``: names -> import paths, capabilities, the once-per-backend check and ``auto``;
- ``sdpa``: torch's ``scaled_dot_product_attention``, free or pinned to one kernel;
- ``external``: FlashAttention 2/3 and SageAttention, when installed;
- ``quantization``: the math of our INT8 attention in plain PyTorch (the kernels' reference);
- ``sparsity``: which tiles the block-sparse variant skips (pooled q/k prediction);
- ``int8_triton``: our Triton kernels (INT8 QK^T, BF16 or FP8 PV, dense or block-sparse).

This package imports nothing itself; the registry loads a backend's module when it is chosen.
"""
