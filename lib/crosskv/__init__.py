"""crosskv: cross-layer KV-cache compression (KVSharer, xKV, MiniCache, CommonKV), implemented and measured.

Public API: :func:`load_model`, :func:`make_method` (methods by name, see ``python -m crosskv list``),
:func:`evaluate` (score a method on a task with measured memory), :func:`load_records` (the results store).
"""
from crosskv.harness import evaluate
from crosskv.methods import make_method
from crosskv.models import load_model
from crosskv.results import load_records

__all__ = ["evaluate", "load_model", "load_records", "make_method"]
__version__ = "0.1.0"
