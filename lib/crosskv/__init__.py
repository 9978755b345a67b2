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
- **compressed context** — what a cache holds once its method has compressed the prompt (``runner.compress``).
  **The cache contract** (every registered method and every valid composition; proven by
  ``tests/test_contract.py`` over the registry): (a) a block of n tokens appended after the compressed context gives
  the logits of n one-token forwards (float32: ≤ 1e-4); (b) the compressed context is immutable: what is appended
  after it (question, answer, forced gold tokens) lives apart and ``cache.crop(context_length)`` drops it exactly,
  any number of times; (c) ``cache.reset()`` forgets everything, or raises an error naming the method; (d) batch
  rows are independent, or a batch of different rows is refused naming the method; (e) every tensor a layer keeps is
  on its layer's device and owns its storage; (f) held bytes = census = ``kv_bytes`` after the prefill, after
  compression, after every decode step and after a drop. A combination that cannot keep it is refused by name.
"""
import importlib

# public name → the module defining it, imported on first use (PEP 562): ``import crosskv.core.models`` loads
# no more than that module needs, never the harness, the methods or kvpress
_PUBLIC = {"evaluate": "crosskv.run.harness", "make_method": "crosskv.methods", "load_model": "crosskv.core.models",
           "load_records": "crosskv.run.results", "compressed": "crosskv.run.session",
           "as_press": "crosskv.integrations.kvpress"}


def __getattr__(name: str):
    """The public API on first use; ``as_press`` imports kvpress and registers ``crosskv-text-generation``."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'crosskv' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"
