"""crosskv: cross-layer KV-cache compression (KVSharer, xKV, MiniCache, CommonKV), implemented and measured.

Public API: :func:`load_model`, :func:`make_method` (methods by name, see ``python -m crosskv list``),
:func:`evaluate` (score a method on a task with measured memory), :func:`load_records` (the results store),
:func:`compressed` (``model.generate`` from a compressed context), :func:`as_press` (a method as a press for
``pipeline("crosskv-text-generation")``, kvpress's pipeline). lm-evaluation-harness: :mod:`crosskv.integrations.lmeval`.

Glossary (records, tables and code use these words in these senses only):

- **held bytes** — every byte a cache (and the runner beside it) keeps alive between decode steps: bases,
  factors, codes, scales, residual windows, buffers, and the whole storage a view pins. Found by the
  census (:mod:`crosskv.cache.census`), which walks what is reachable and leaves model weights out;
  records carry it as ``kv_bytes_held``, beside the method's own accounting ``kv_bytes``
  (:func:`crosskv.cache.storage.kv_bytes`), which must agree with it.
- **kept** — bytes as a fraction of a plain cache: ``kept = kv_bytes / kv_bytes_full`` and
  ``kept_held = kv_bytes_held / kv_bytes_full``, where ``kv_bytes_full`` is a plain ``DynamicCache`` of the
  same tokens (2·L·B·H_kv·T·d·element size; 16-bit in the default bfloat16 runs, and ``kept_16bit``
  counts every float at 2 bytes against a 16-bit plain cache for float32 runs). Always bytes, never a
  count of layers, tokens or ranks (a KVSharer strategy's share of storing layers is ``layers_kept``).
- **seen tokens** — the tokens a layer has been fed so far (its position counter; what
  ``get_seq_length()`` reports for every crosskv layer, evicted and merged tokens included).
  **held tokens** — the tokens whose keys/values (or compressed form) a layer still stores and attends
  to (the length in ``get_mask_sizes``): fewer than seen after eviction, none of its own for a KVSharer
  consumer.
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
