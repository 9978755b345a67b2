"""Which path a decode step takes (a Triton kernel or eager torch), and the kernels' shared launch choices.

Kernels run on CUDA tensors when Triton is installed. On CPU they run only when forced (tests), under
Triton's interpreter. In Triton 3.9 the interpreter is chosen when a function is *decorated* with
``@triton.jit``, and Triton's own language library (``tl.zeros``, ``tl.sum``, ``tl.max``…) is decorated
when ``triton`` is first imported, which ``import transformers`` already does (through
``torch._dynamo``): ``TRITON_INTERPRET=1`` must be in the environment when the process starts, and
setting it later changes nothing. Forcing the kernels on CPU without it raises rather than silently
running eager code.
"""
from __future__ import annotations

import collections
import functools
import importlib.util
import os

import torch

FORCE_ENV = ("CROSSKV_TRITON_INTERPRET", "TRITON_INTERPRET")  # "1": run the kernels on CPU tensors (interpreter)
MIN_DOT = 16           # tl.dot needs every block dimension ≥ 16 on a GPU
PROGRAMS_TARGET = 256  # split the token axis until about this many programs run (untuned heuristic)
# kernel name → launches in this process since the last clear(): what `crosskv bench` reports as a run's `path`
LAUNCHES: collections.Counter = collections.Counter()


@functools.cache
def triton_available() -> bool:
    """Whether ``triton`` is installed here."""
    return importlib.util.find_spec("triton") is not None


def interpret_forced() -> bool:
    """Whether an environment variable of :data:`FORCE_ENV` asks for the kernels on CPU (the interpreter)."""
    return any(os.environ.get(name) == "1" for name in FORCE_ENV)


def use_kernel(x: torch.Tensor) -> bool:
    """True when the Triton kernel should handle ``x``: on CUDA with Triton installed, or on CPU when forced."""
    if x.is_cuda:
        return triton_available()
    if x.device.type != "cpu" or not interpret_forced() or not triton_available():
        return False
    if not interpreter_active():
        raise RuntimeError(f"{' or '.join(FORCE_ENV)}=1 asks for Triton kernels on CPU, but triton was imported "
                           "without TRITON_INTERPRET=1, so its language library is built for the GPU; set "
                           "TRITON_INTERPRET=1 in the environment before the process starts")
    if x.dtype == torch.bfloat16:
        raise ValueError("Triton 3.9's interpreter computes tl.dot wrongly on bfloat16 operands (errors ~1e10): "
                         "run interpreted kernels in float32 or float16")
    return True


def interpreter_active() -> bool:
    """Whether Triton's language library was built for the interpreter (``TRITON_INTERPRET=1`` at its import)."""
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(standard.zeros, InterpretedFunction)


def block(size: int) -> int:
    """A ``tl.dot``-able block covering ``size``: the next power of two, at least :data:`MIN_DOT`."""
    return max(MIN_DOT, 1 << max(0, size - 1).bit_length())


def precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: exact IEEE products for float32 inputs (no TF32), else the default."""
    return "ieee" if dtype == torch.float32 else "tf32"


def split_plan(tokens: int, block_t: int, programs: int, splits: int | None = None) -> tuple[int, int]:
    """``(splits, split_len)``: the token axis cut into ``splits`` chunks of ``split_len`` (a multiple of ``block_t``).

    ``programs`` run without splitting (batch × heads); by default the axis is split until about
    :data:`PROGRAMS_TARGET` programs run, never into chunks shorter than one block.
    """
    tiles = max(1, -(-tokens // block_t))
    if splits is None:
        splits = max(1, min(tiles, PROGRAMS_TARGET // max(1, programs)))
    if splits <= 0:
        raise ValueError(f"splits={splits} must be positive")
    split_len = -(-tiles // splits) * block_t
    return splits, split_len
