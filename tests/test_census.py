"""The memory census: storage-level bytes on hand-made objects, and held == reported for every method and composition.

Every accepted configuration must run (any error fails the test, a ``ValueError`` included) and match; the
configurations refused are exactly those the composition matrix declares (same message); both counts are
asserted exactly, so a configuration that starts failing or stops being built cannot drop out silently."""
from __future__ import annotations

import collections
import dataclasses
import logging
import time

import pytest
import torch

from crosskv.cache.census import RunCensus, held_bytes, held_tensors

log = logging.getLogger(__name__)


# --- hand-made objects --------------------------------------------------------------------------

def test_a_view_counts_its_whole_storage_and_shared_storage_counts_once():
    base = torch.zeros(100, 8)  # 3200 bytes
    assert held_bytes(base[:1]) == 3200  # a one-row view pins the whole storage
    assert held_bytes([base[:10], base[50:], base.t()]) == 3200  # three views of one storage: once
    assert held_bytes(base[:0]) == 3200  # even an empty view
    assert held_bytes({"a": base, "b": torch.ones(4)}) == 3200 + 16
    assert len(held_tensors(base, base[3:], base.clone())) == 2


@dataclasses.dataclass
class Holder:
    tensor: torch.Tensor
    note: str = ""


class Slotted:
    __slots__ = ("left", "right", "__weakref__")

    def __init__(self, left, right):
        self.left, self.right = left, right


class SlottedChild(Slotted):
    __slots__ = ("extra",)

    def __init__(self, left, right, extra):
        super().__init__(left, right)
        self.extra = extra


class Plain:
    pass


def test_slots_dataclasses_containers_and_tensor_attributes_are_walked():
    a, b, c = torch.ones(10), torch.ones(20), torch.ones(30)
    obj = SlottedChild(Holder(a), collections.deque([(b,)]), {frozenset([1]): [c]})
    assert held_bytes(obj) == 4 * 60
    tagged = torch.ones(2)
    tagged.extra = (torch.ones(5), "text")  # an attribute hung on a tensor keeps its value alive
    assert held_bytes(tagged) == 4 * 7
    unset = SlottedChild.__new__(SlottedChild)  # unset slots are skipped, not errors
    assert held_bytes(unset) == 0


def test_cycles_terminate_and_count_once():
    x, y = Plain(), Plain()
    x.other, y.other = y, x
    x.t = y.t = torch.ones(8)
    x.me = x
    loop = [x]
    loop.append(loop)
    assert held_bytes(loop, x, y) == 32


def test_model_weights_modules_and_baseline_are_not_held():
    layer = torch.nn.Linear(4, 4)
    holder = Plain()
    holder.module = layer  # modules are not entered
    holder.alias = layer.weight.detach()[:2]  # a view of a weight: excluded by storage when the model is given
    holder.own = torch.ones(3)
    assert held_bytes(holder) == 16 * 4 + 12  # without exclusion the aliased weight storage is found
    assert held_bytes(holder, exclude=[layer]) == 12
    before = torch.ones(100)
    holder.before = before
    assert held_bytes(holder, exclude=[layer], baseline=[before]) == 12


def test_run_census_excludes_what_the_runner_held_before_the_cache():
    class Runner:
        def __init__(self):
            self.model = torch.nn.Linear(2, 2)
            self.tokenizer = None
            self.factors = torch.ones(50)  # per-model precomputation
            self.leak = None

    runner = Runner()
    census = RunCensus(runner)
    cache = [torch.ones(10)]
    assert census.held(cache) == 40
    runner.leak = torch.ones(25)  # state the runner keeps during the run is held
    assert census.held(cache) == 40 + 100


# --- every method and composition on the embedded model -------------------------------------------

CONTEXT, DECODE = 256, 3  # past KIVI's float window (residual 64) and a few groups of codes


# every registered method alone (13), and 13 bases (8 cross-layer, selective included, + 5 kvpress presses) × 11
# (evict, bits) pairs (6 evictions × {0, one width} less the bare base): 143 compositions, of which the matrix
# refuses the 5 kvpress bases (55) and kvsharer_xkv under eviction (5 evictions × 2 = 10) → 78 accepted; 13 + 78 = 91
EXPECTED_RUN, EXPECTED_REFUSED = 91, 65


def _method_configs(tmp_path, model):
    """Every registered method (cheap settings where a default would calibrate) and every composition
    base × eviction, unquantized and quantized → (accepted configs, refused ones with their errors,
    the refusal the composition matrix declares for each composition)."""
    from crosskv.methods import REGISTRY, make_method
    from crosskv.methods.compose import EVICTIONS, bases, composition_matrix
    from crosskv.methods.kvsharer import SharingStrategy
    from crosskv.cache.quant import BITS

    layers = model.config.num_hidden_layers
    strategy = tmp_path / "strategy.json"
    SharingStrategy(mapping={c: c - 1 for c in range(layers - 1, layers // 2, -2)}, num_layers=layers).save(strategy)
    cheap = {"kvsharer": {"strategy": str(strategy)}, "kvsharer_xkv": {"strategy": str(strategy)},
             "commonkv": {"weights": "uniform"}}
    base_params = {"kvsharer": f"strategy={strategy}", "kvsharer_xkv": f"strategy={strategy}", "commonkv": "weights=uniform"}
    declared = {(r["base"], r["evict"], r["bits"]): None if r["supported"] else r["rule"] for r in composition_matrix()}
    configs = [(name, cheap.get(name, {}), None) for name in sorted(REGISTRY) if name != "compose"]
    for b, base in enumerate(bases(include_refused=True)):
        for e, evict in enumerate(EVICTIONS):
            # bits 2/4/8 share one storage path (their packing is unit-tested in test_quant): each (base, evict)
            # pair runs unquantized and at one bit width, rotated so every width meets every base and eviction
            for bits in (0, BITS[(b + e) % len(BITS)]):
                if evict == "none" and bits == 0:
                    continue  # the base alone, already above
                params = {"base": base, "base_params": base_params.get(base, ""), "evict": evict,
                          "evict_ratio": 0.5 if evict != "none" else 0.0, "bits": bits, "residual": 64}
                configs.append(("compose", params, declared[(base, evict, bits)]))
    refused, accepted, undeclared = [], [], []
    for name, params, reason in configs:
        try:
            config = make_method(name, **params)
        except ValueError as err:
            refused.append((name, params, str(err)))
            if str(err) != reason:
                undeclared.append(f"{_label(name, params)} refused with {str(err)!r}; the matrix declares {reason!r}")
            continue
        accepted.append((name, params, config))
        if reason is not None:
            undeclared.append(f"{_label(name, params)} accepted; the matrix refuses it: {reason}")
    return accepted, refused, undeclared


def _label(name, params) -> str:
    shown = {k: v for k, v in params.items() if k not in ("base_params", "strategy", "weights")}
    return name + "".join(f" {k}={v}" for k, v in shown.items())


def _bound(config, model, tok):
    """``config`` bound to ``model`` once per process (:func:`crosskv.run.harness.bind`); a composition's base
    runner is the one bound for that base alone, so 11 compositions over one base share its weight SVD or
    search (its per-model state; what each run holds is counted by the census all the same)."""
    from crosskv.methods.compose import Compose, ComposeRunner
    from crosskv.run.harness import bind

    if isinstance(config, Compose):
        return ComposeRunner(config, model, tok, bind(model, tok, config.base_config()))
    return bind(model, tok, config)


@pytest.mark.slow
def test_held_equals_reported_for_every_method_and_composition(model16, tmp_path):
    """Held bytes (the census) equal ``kv_bytes`` exactly after compression and after decoding, for every
    configuration. The context is prefilled once, unmodified, for every configuration that compresses a plain
    prefill or replays its first layers (as :func:`crosskv.run.harness.evaluate_grid` runs them); the others
    (eviction scores and in-prefill methods) run their own prefill."""
    from crosskv.core.data import heldout_text
    from crosskv.run.harness import _prefill, feed, plain_prefill
    from crosskv.cache.storage import kv_bytes

    model, tok = model16
    device = next(model.parameters()).device
    ids = tok(heldout_text(tok, CONTEXT + 100), return_tensors="pt").input_ids[0, :CONTEXT].tolist()
    question = tok(" What is the essay about?", return_tensors="pt").input_ids[0].tolist()
    accepted, refused, undeclared = _method_configs(tmp_path, model)
    assert not undeclared, "\n".join(undeclared)
    runners, crashed = {}, []
    for name, params, config in accepted:
        try:
            runners[_label(name, params)] = _bound(config, model, tok)
        except Exception as err:  # noqa: BLE001  (an accepted configuration must bind: every failure is listed)
            crashed.append(f"{_label(name, params)}: {type(err).__name__}: {str(err)[:120]}")
    lower = {runner.plain_layers() for runner in runners.values() if not runner.config.plain_prefill}
    shared = plain_prefill(model, ids, attention=True, outputs_of={count - 1 for count in lower if count})
    mismatches, ran = [], 0
    for name, params, config in accepted:
        label = _label(name, params)
        if label not in runners:
            continue
        runner, started = runners[label], time.perf_counter()
        sharing = config.plain_prefill or runner.plain_layers() > 0
        try:
            with runner.applied(), torch.no_grad():
                census = RunCensus(runner)
                cache = runner.new_cache()
                _prefill(runner, cache, ids, device, hidden=False, shared=shared if sharing else None)
                moments = [(kv_bytes(cache), census.held(cache))]
                logits = feed(model, cache, question, len(ids), device)
                fed = len(ids) + len(question)
                for _ in range(DECODE):
                    logits = feed(model, cache, [int(logits.argmax())], fed, device)
                    fed += 1
                moments.append((kv_bytes(cache), census.held(cache)))
        except Exception as err:  # noqa: BLE001  (an accepted configuration must run: every failure is listed)
            crashed.append(f"{label}: {type(err).__name__}: {str(err)[:120]}")
            continue
        ran += 1
        log.info("%s: %.1f s (%s prefill), held - reported %s", label, time.perf_counter() - started,
                 "shared" if sharing else "own", [h - r for r, h in moments])
        for when, (reported, held) in zip(("compress", "end"), moments):
            if held != reported:
                mismatches.append(f"{label} at {when}: reported {reported}, held {held} ({held - reported:+d})")
    log.info("census: %d configurations measured, %d refused: %s", ran, len(refused),
             [(_label(n, p), e[:60]) for n, p, e in refused])
    assert not crashed, "\n".join(crashed)
    assert not mismatches, "\n".join(mismatches)
    assert (ran, len(refused)) == (EXPECTED_RUN, EXPECTED_REFUSED)
