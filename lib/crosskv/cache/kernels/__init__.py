"""Fused decode attention on compressed caches (Triton), each with an eager reference and a dispatcher.

One query token per sequence, ``q`` ``(B, H_kv, g, d)`` (``g`` query heads per KV head), over a compressed
prefix plus an exact tail, in one float32 softmax:

- :mod:`.factored`: a low-rank prefix (xKV, Single SVD), keys rebuilt tile by tile with RoPE in the kernel;
- :mod:`.kivi`: a KIVI-quantized prefix, attention straight from the packed codes;
- :mod:`.selective`: only the chosen tokens of a low-rank prefix, rebuilt and attended in one launch.

Each public function runs its kernel when :func:`.launch.use_kernel` is true (CUDA with Triton, or CPU under
Triton's interpreter when ``TRITON_INTERPRET=1``/``CROSSKV_TRITON_INTERPRET=1``), else its ``*_eager`` reference.
References read (not copied): xKV ``efficiency/ops/fused_attention/rope/v1.py``, Palu ``kernel/abx_rope.py``,
KIVI ``quant/new_pack.py``.
"""
from crosskv.cache.kernels.factored import factored_decode_attention, factored_decode_scores
from crosskv.cache.kernels.kivi import kivi_decode_attention
from crosskv.cache.kernels.launch import use_kernel
from crosskv.cache.kernels.selective import selective_decode_attention

__all__ = ["factored_decode_attention", "factored_decode_scores", "kivi_decode_attention",
           "selective_decode_attention", "use_kernel"]
