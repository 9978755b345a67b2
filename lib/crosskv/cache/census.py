"""Memory census: the bytes a cache (and the runner beside it) really keeps alive, independent of any method's bookkeeping.

:func:`held_tensors` walks every object reachable from its roots — attributes (``__dict__`` and
``__slots__``), dict/list/tuple/set/frozenset entries, dataclass fields and a tensor's own
``__dict__`` — guarding against cycles, and collects every tensor found, one per untyped storage.
:func:`held_bytes` sums each storage's full size (``untyped_storage().nbytes()``): a view that pins
a larger storage counts as that whole storage.

Model weights are not held bytes: ``torch.nn.Module`` objects are not entered at all, and storages
of the ``exclude`` modules' parameters and buffers are skipped wherever they are reached from
(a factor that aliases a weight). Tokenizers are skipped, as are classes, functions and modules.
A method's own ``stored_tensors()`` is never consulted; the census is its independent check.
:class:`RunCensus` is what the harness uses: cache + runner, less what the runner held before the run.
"""
from __future__ import annotations

import collections
import dataclasses
import types
from typing import Any, Iterable, Iterator

import torch

_ATOMS = (str, bytes, bytearray, int, float, complex, bool, type(None), torch.dtype, torch.device,
          torch.Size, range, slice)
_OPAQUE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
           types.CodeType, types.FrameType, types.GeneratorType, torch.nn.Module)


def _storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    """Identity of a tensor's untyped storage: (device, address of its first byte)."""
    storage = tensor.untyped_storage()
    return str(tensor.device), storage.data_ptr()


def _excluded_keys(modules: Iterable[torch.nn.Module]) -> set[tuple[str, int]]:
    keys = set()
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            keys.add(_storage_key(tensor))
    return keys


def _is_tokenizer(obj: Any) -> bool:
    """Hugging Face tokenizers (slow or fast) and their Rust backends, recognised by class ancestry."""
    names = {cls.__name__ for cls in type(obj).__mro__}
    return bool(names & {"PreTrainedTokenizerBase", "Tokenizer", "ProcessorMixin"}) or \
        type(obj).__module__.startswith("tokenizers")


def _children(obj: Any) -> Iterator[Any]:
    """Objects directly referenced by ``obj`` through containers, ``__dict__``, ``__slots__`` and dataclass fields."""
    if isinstance(obj, dict):
        yield from obj.keys()
        yield from obj.values()
        return
    if isinstance(obj, (list, tuple, set, frozenset, collections.deque)):
        yield from obj
        return
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for field in dataclasses.fields(obj):
            yield getattr(obj, field.name, None)
    attrs = getattr(obj, "__dict__", None)
    if isinstance(attrs, dict):
        yield from attrs.values()
    for cls in type(obj).__mro__:
        for name in getattr(cls, "__slots__", ()):
            if name in ("__dict__", "__weakref__"):
                continue
            try:
                yield getattr(obj, name)
            except AttributeError:
                continue


def held_tensors(*roots: Any, exclude: Iterable[torch.nn.Module] = (),
                 baseline: Iterable[torch.Tensor] = ()) -> list[torch.Tensor]:
    """One tensor per distinct storage reachable from ``roots``, leaving out the parameters and buffers of the
    ``exclude`` modules and the storages of ``baseline`` (tensors held before the run: a runner's
    per-model precomputation, which the caller keeps alive while it measures)."""
    excluded = _excluded_keys(exclude) | {_storage_key(t) for t in baseline}
    seen_objects: set[int] = set()
    seen_storages: set[tuple[str, int]] = set()
    found: list[torch.Tensor] = []
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if isinstance(obj, _ATOMS) or isinstance(obj, _OPAQUE) or id(obj) in seen_objects:
            continue
        seen_objects.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.device.type != "meta":
                key = _storage_key(obj)
                if key not in excluded and key not in seen_storages and obj.untyped_storage().nbytes():
                    seen_storages.add(key)
                    found.append(obj)
            stack.extend(getattr(obj, "__dict__", {}).values())  # attributes hung on a tensor
            continue
        if _is_tokenizer(obj):
            continue
        stack.extend(_children(obj))
    return found


def held_bytes(*roots: Any, exclude: Iterable[torch.nn.Module] = (), baseline: Iterable[torch.Tensor] = ()) -> int:
    """Full storage bytes of every distinct storage reachable from ``roots`` (see :func:`held_tensors`)."""
    return sum(t.untyped_storage().nbytes() for t in held_tensors(*roots, exclude=exclude, baseline=baseline))


class RunCensus:
    """The census of one run: ``RunCensus(runner)`` before the run's cache exists records what the runner
    already holds (per-model precomputation such as weight factors, not held by the run); :meth:`held`
    then counts every storage reachable from the cache and the runner, model weights excluded.
    The baseline tensors are kept referenced so their addresses cannot be reused by the run."""

    def __init__(self, runner):
        self.runner = runner
        self.model = runner.model
        self.baseline = held_tensors(runner, exclude=[self.model])

    def held(self, cache) -> int:
        return held_bytes(cache, self.runner, exclude=[self.model], baseline=self.baseline)
