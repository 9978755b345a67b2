"""crosskv: cross-layer KV-cache compression (KVSharer, xKV, MiniCache, CommonKV), implemented and measured.

Public API: :func:`load_model`, :func:`make_method` (methods by name, see ``python -m crosskv list``),
:func:`evaluate` (score a method on a task with measured memory), :func:`load_records` (the results store),
:func:`compressed` (``model.generate`` from a compressed context), :func:`as_press` (a method as a press for
``pipeline("crosskv-text-generation")``, kvpress's pipeline). lm-evaluation-harness: :mod:`crosskv.integrations.lmeval`.
"""
from crosskv.run.harness import evaluate
from crosskv.methods import make_method
from crosskv.core.models import load_model
from crosskv.run.results import load_records
from crosskv.run.session import compressed


def as_press(method):
    """``method`` as a kvpress press (imports kvpress and registers ``crosskv-text-generation``)."""
    from crosskv.integrations.kvpress import as_press as adapt

    return adapt(method)


__all__ = ["as_press", "compressed", "evaluate", "load_model", "load_records", "make_method"]
__version__ = "0.1.0"
