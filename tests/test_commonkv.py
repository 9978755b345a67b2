"""CommonKV: weight sharing exactness, latent cache, adaptive merge, accounting, measurements, bad input."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, Qwen2Config

import accounting
from conftest import drive_cache
from crosskv.cache.census import held_bytes
from crosskv.core import budget
from crosskv.core.capture import attention_modules, kv_shape
from crosskv.cache.storage import kv_bytes
from crosskv.methods import commonkv, make_method
from crosskv.methods.commonkv import calibration as commonkv_calibration
from crosskv.methods.commonkv.cache import CommonKVCache, merge_groups
from crosskv.methods.commonkv.calibration import cached_measurement, key_noise_sensitivity, value_fisher
from crosskv.methods.commonkv.weights import LatentKeyProj


def tiny_model(arch: str, layers: int = 6):
    """A random float32 Llama/Qwen2 (D=64, 4 heads, 2 KV heads, d=16); Qwen2 gets non-zero q/k/v biases."""
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    if arch == "qwen2":
        with torch.no_grad():
            for attn in attention_modules(model):
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    return model


def ids(n: int, seed: int = 1, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def plain_logits(model, tokens: torch.Tensor, split: int) -> torch.Tensor:
    cache = DynamicCache(config=model.config)
    first = model(tokens[:, :split], past_key_values=cache).logits
    rest = [model(tokens[:, i:i + 1], past_key_values=cache).logits for i in range(split, tokens.shape[1])]
    return torch.cat([first, *rest], dim=1)


@torch.no_grad()
def run(runner, model, tokens: torch.Tensor, split: int, after_compress=None):
    """Prefill ``tokens[:split]``, compress, then feed the rest one token at a time → (logits, cache)."""
    with runner.applied():
        cache = runner.new_cache()
        with runner.prefill(cache):
            first = model(tokens[:, :split], past_key_values=cache).logits
        runner.compress(cache)
        if after_compress:
            after_compress(cache)
        rest = [model(tokens[:, i:i + 1], past_key_values=cache).logits for i in range(split, tokens.shape[1])]
    return torch.cat([first, *rest], dim=1), cache


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("attend", ["buffer", "rebuild"])
def test_full_rank_equals_plain_cache(arch, attend):
    model = tiny_model(arch)
    tokens = ids(40)
    ref = plain_logits(model, tokens, 32)
    runner = make_method("commonkv", rank_ratio="1", unmerged_ratio="1", attend=attend).bind(model)
    assert runner.ranks == [64, 64]  # D = 64 = the full rank of each group
    got, cache = run(runner, model, tokens, 32)
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()
    assert cache.get_seq_length() == 40


def test_modules_replaced_inside_and_restored_after():
    model = tiny_model("llama")
    originals = [(a.k_proj, a.v_proj) for a in attention_modules(model)]
    runner = make_method("commonkv", rank="32", unmerged_ratio="1").bind(model)
    with runner.applied():
        attns = attention_modules(model)
        assert all(isinstance(a.k_proj, LatentKeyProj) for a in attns)
        assert attns[0].k_proj.down is attns[3].v_proj.down  # one shared down-projection per group
        assert attns[0].k_proj.down is not attns[4].k_proj.down
    assert [(a.k_proj, a.v_proj) for a in attention_modules(model)] == originals


def test_lower_rank_is_lossy_and_error_shrinks_with_rank():
    model = tiny_model("llama")
    tokens = ids(24)
    ref = plain_logits(model, tokens, 24)
    errors = [(run(make_method("commonkv", rank=str(r), unmerged_ratio="1").bind(model), model, tokens, 24)[0]
               - ref).abs().max().item() for r in (16, 48, 64)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-4


def test_merge_with_ratio_one_equals_unmerged_cache():
    model = tiny_model("llama")
    tokens = ids(60)
    runner = make_method("commonkv", rank="40", unmerged_ratio="1").bind(model)
    plain, _ = run(runner, model, tokens, 50)
    counts = []
    merged, cache = run(runner, model, tokens, 50, after_compress=lambda c: counts.extend(
        merge_groups(c, runner.weights, 1.0, sinks=4, recent=8)))
    assert counts == [0, 0]
    assert torch.equal(merged, plain)


def test_merge_drops_bytes_and_matches_accounting():
    model = tiny_model("llama")
    tokens = ids(70)
    runner = make_method("commonkv", rank="48", unmerged_ratio="0.4", weights="uniform", sink_tokens="4",
                         recent_tokens="8").bind(model)
    _, cache = run(runner, model, tokens, 64)
    counts = runner.merged_counts
    candidates = 64 - 4 - 8
    assert sum(counts) == 2 * candidates - round(0.4 * 2 * candidates)  # global bottom-k over both groups
    sizes = [len(g) for g in runner.groups]
    expected = accounting.commonkv_bytes(runner.ranks, sizes, 70, counts, float_bytes=4)
    assert kv_bytes(cache) == expected
    unmerged = accounting.commonkv_bytes(runner.ranks, sizes, 70, [0, 0], float_bytes=4)
    assert kv_bytes(cache) < unmerged
    for store, count in zip(cache.stores, counts):  # merged entries stored once per group
        assert store.lat.shape == (1, count, 48)


def test_rebuild_and_buffer_agree_after_merge():
    model = tiny_model("qwen2")
    tokens = ids(56)
    outs, held = [], []
    for attend in ("buffer", "rebuild"):
        runner = make_method("commonkv", rank="48", unmerged_ratio="0.3", weights="uniform", recent_tokens="4",
                             attend=attend).bind(model)
        logits, cache = run(runner, model, tokens, 48)
        outs.append(logits)
        buffers = [t for layer in cache.layers if layer.buffer is not None for t in layer.buffer]
        held.append((kv_bytes(cache), sum(t.numel() * t.element_size() for t in buffers)))
    assert torch.allclose(outs[0], outs[1], atol=1e-4)
    (buffered, buffer_bytes), (latent_only, none) = held
    assert none == 0 and buffer_bytes > 0
    assert buffered == latent_only + buffer_bytes  # the speed buffer is held memory: counted, never hidden


def test_merged_entry_is_the_weighted_average():
    model = tiny_model("llama")
    tokens = ids(40)
    runner = make_method("commonkv", rank="64", unmerged_ratio="1").bind(model)
    weights = [0.1, 0.2, 0.3, 0.4, 0.25, 0.75]
    snapshot = {}

    def merge(cache: CommonKVCache):
        snapshot["lat"] = [layer.own_latents().clone() for layer in cache.layers]
        merge_groups(cache, weights, 0.0, sinks=2, recent=2)

    _, cache = run(runner, model, tokens, 40, after_compress=merge)
    store = cache.stores[0]
    pos = store.pos.long()
    assert pos.tolist() == list(range(2, 38))
    expected = sum(w * snapshot["lat"][i][:, pos] for i, w in enumerate(weights[:4]))
    assert torch.allclose(store.lat, expected, atol=1e-5)


def test_noise_sensitivity_weights_sum_to_one_per_group():
    model = tiny_model("llama")
    deltas = key_noise_sensitivity(model, ids(32, vocab=128).repeat(2, 1))
    assert len(deltas) == 6 and any(d != 0 for d in deltas)
    groups = budget.layer_groups(6, 4)
    weights = budget.normalise_within_groups(deltas, groups)
    for group in groups:
        assert sum(weights[i] for i in group) == pytest.approx(1.0)
        assert all(weights[i] >= 0 for i in group)


def test_value_fisher_positive_and_restores_grad_flags():
    model = tiny_model("llama")
    flags = [p.requires_grad for p in model.parameters()]
    fisher = value_fisher(model, ids(16).repeat(2, 1))
    assert len(fisher) == 6 and all(f > 0 for f in fisher)
    assert [p.requires_grad for p in model.parameters()] == flags


@pytest.mark.parametrize("params, message", [
    ({"rank": "65"}, "rank=65"),
    ({"group_size": "0"}, "group_size=0"),
    ({"group_size": "7"}, "group_size=7"),
    ({"weights": "magic"}, "weights='magic'"),
    ({"unmerged_ratio": "1.5"}, "unmerged_ratio=1.5"),
    ({"rank_ratio": "-0.1"}, "rank_ratio=-0.1"),
    ({"ranks": "fisher", "rank": "32"}, "rank=32"),
])
def test_bad_input_names_the_value(params, message):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        make_method("commonkv", **params).bind(model)


@pytest.mark.slow
def test_embedded_model_full_rank_exact_and_merge_saves(model32):
    model, tokenizer = model32
    tokens = torch.randint(100, 10000, (1, 200), generator=torch.Generator().manual_seed(0))
    ref = plain_logits(model, tokens, 192)
    runner = make_method("commonkv", rank_ratio="1", unmerged_ratio="1").bind(model, tokenizer)
    got, cache = run(runner, model, tokens, 192)
    assert torch.allclose(got, ref, atol=2e-4), (got - ref).abs().max()
    full = accounting.full_bytes(kv_shape(model), 200, float_bytes=4)
    assert kv_bytes(cache) == accounting.commonkv_bytes(runner.ranks, [len(g) for g in runner.groups], 200,
                                                        [0] * 8, float_bytes=4)
    assert kv_bytes(cache) > full  # an unmerged full-rank latent (576) is wider than one layer's K+V (384)


def test_measurements_cached_on_disk_once(tmp_path, monkeypatch):
    monkeypatch.setattr(commonkv_calibration, "cache_dir", lambda: tmp_path)
    model = tiny_model("llama")
    calls = []

    def compute():
        calls.append(1)
        return [0.5, 1.5]

    first = cached_measurement("fisher", model, {"calibration": 2}, compute)
    again = cached_measurement("fisher", model, {"calibration": 2}, compute)
    other = cached_measurement("fisher", model, {"calibration": 3}, compute)
    assert first == again == other == [0.5, 1.5] and len(calls) == 2
    assert len(list(tmp_path.glob("*-fisher-*.json"))) == 2


def test_measurements_follow_code_and_weights_and_survive_a_torn_file(tmp_path, monkeypatch, caplog):
    from crosskv.core import fingerprint

    monkeypatch.setattr(commonkv_calibration, "cache_dir", lambda: tmp_path)
    model = tiny_model("llama")
    calls = []

    def compute():
        calls.append(1)
        return [float(len(calls))]

    assert cached_measurement("fisher", model, {}, compute) == [1.0]
    (path,) = tmp_path.glob("*.json")
    path.write_text("{ torn")
    with caplog.at_level("WARNING"):
        assert cached_measurement("fisher", model, {}, compute) == [2.0]
    assert str(path) in caplog.text and cached_measurement("fisher", model, {}, compute) == [2.0]
    monkeypatch.setattr(fingerprint, "code_fingerprint", lambda: "changed-code")
    assert cached_measurement("fisher", model, {}, compute) == [3.0]
    other = tiny_model("llama")
    with torch.no_grad():
        other.model.layers[0].self_attn.v_proj.weight.mul_(2)
    assert cached_measurement("fisher", other, {}, compute) == [4.0]


def test_value_fisher_is_the_release_statistic():
    """Per weight √(mean over rows of g²), averaged over the weights (CommonKV/Palu release), not Σ g²."""
    model = tiny_model("llama", layers=2)
    ids = torch.randint(0, 64, (3, 8))
    params = [a.v_proj.weight for a in attention_modules(model)]
    squares = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for row in ids:
        for p in params:
            p.requires_grad_(True)
        loss = model(input_ids=row[None], labels=row[None]).loss
        for total, g in zip(squares, torch.autograd.grad(loss, params)):
            total += g.double() ** 2
    expected = [float((s / 3).sqrt().mean()) for s in squares]
    assert value_fisher(model, ids) == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_embedded_model_fisher_ranks_within_budget(model32, tmp_path, monkeypatch):
    monkeypatch.setattr(commonkv_calibration, "cache_dir", lambda: tmp_path)
    model, tokenizer = model32
    config = make_method("commonkv", ranks="fisher", rank_ratio="0.5", weights="uniform", calibration="2",
                         calibration_length="16")
    runner = config.bind(model, tokenizer)
    assert all(r % 32 == 0 and 32 <= r <= 576 for r in runner.ranks)
    assert len(set(runner.ranks)) > 1  # measured, not uniform
    sizes = [len(g) for g in runner.groups]
    used = sum(s * r for s, r in zip(sizes, runner.ranks))
    assert 0.5 * 576 * 30 - 32 * max(sizes) <= used <= 0.5 * 576 * 30


# --- the default must save bytes; wider latents are flagged ------------------------------------------------

def test_kept_rank_hits_the_nominal_target():
    # SmolLM2-135M: K+V = 384 per layer and token, D = 576; u = 0.4, G = 4 → stored fraction 0.55
    assert commonkv.kept_rank(0.5, 384, 0.55, 576) == 320  # 0.5·384/0.55 = 349 → 320
    assert commonkv.kept_rank(0.5, 2048, 0.55, 4096) == 1856  # Llama-3.1-8B shape
    assert commonkv.kept_rank(1.0, 384, 0.25, 576) == 576  # capped at D
    assert commonkv.kept_rank(0.01, 384, 1.0, 576) == 32  # at least one multiple
    config = make_method("commonkv")
    assert config.kept == 0.5 and config.rank_ratio is None and config.stored_fraction() == pytest.approx(0.55)
    assert make_method("commonkv", rank_ratio="0.8").kept is None  # an explicit rank budget replaces the target
    with pytest.raises(ValueError, match="kept=1.5"):
        make_method("commonkv", kept="1.5")


def _gqa_model(kv_heads: int):
    """D = 64, 4 query heads of d = 16 and ``kv_heads`` KV heads: K+V = 2·kv_heads·16 per layer and token."""
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=1024)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).float().eval()


def test_wider_latent_is_flagged_and_the_default_is_not():
    model = _gqa_model(kv_heads=1)  # K+V = 32 < D = 64
    wide = make_method("commonkv", rank_ratio="1.0", weights="uniform").bind(model, None)
    assert wide.ranks == [64] and wide.record_fields() == {"latent_ranks": [64], "kv_width": 32,
                                                          "latent_wider_than_kv": True}
    default = make_method("commonkv", weights="uniform").bind(model, None)
    assert default.ranks == [32] and default.record_fields()["latent_wider_than_kv"] is False  # 0.5·32/0.55 → 32


@pytest.mark.slow
def test_embedded_default_holds_less_than_a_plain_cache(model32):
    from conftest import drive

    model, tokenizer = model32
    ids = torch.randint(100, 5000, (1, 600), generator=torch.Generator().manual_seed(0))
    method = make_method("commonkv", weights="uniform")
    _, cache = drive(model, method, ids[:, :512], ids[:, 512:520], decode_steps=2)
    plain = 2 * 30 * 3 * 64 * 522 * 4  # float32 K+V of 522 tokens
    assert kv_bytes(cache) / plain < 0.65
    assert method.bind(model, tokenizer).record_fields()["latent_wider_than_kv"] is False


def test_token_and_input_cosines_per_group():
    from crosskv.core.capture import capture, decoder_layers
    from crosskv.methods.commonkv.analysis import group_cosines, input_cosines, prompt_latents, token_cosines

    model = tiny_model("llama", layers=5)  # groups of 4: [0..3], [4]
    runner = make_method("commonkv", unmerged_ratio="1", weights="uniform").bind(model)
    tokens = ids(12)
    cache = prompt_latents(runner, tokens)
    per_token = token_cosines(cache)
    assert per_token[0].shape == (12,) and per_token[1] is None
    assert group_cosines(cache)[0] == pytest.approx(float(per_token[0].mean()))
    hidden = capture(model, [tokens], fields=("hidden",)).hidden  # (L+1, 1, T, D)
    inputs = input_cosines(model, hidden, runner.groups)
    layers = decoder_layers(model)
    first, last = layers[0].input_layernorm(hidden[0, 0]), layers[3].input_layernorm(hidden[3, 0])
    assert torch.allclose(inputs[0], torch.nn.functional.cosine_similarity(first, last, dim=-1), atol=1e-5)
    assert inputs[1] is None


# --- decode without rebuilding V; the explicit channel; method overhead; devices ----------------------------

def test_decode_hands_latent_values_to_attention_and_long_chunks_rebuild():
    from crosskv.cache.attention import CompressedKV
    from crosskv.methods.commonkv.attention import LatentPrefix

    model = tiny_model("qwen2")
    runner = make_method("commonkv", rank="48", unmerged_ratio="0", weights="uniform", recent_tokens="4").bind(model)
    tokens = ids(60)
    returned = []
    with runner.applied():
        cache = runner.new_cache()
        layer = cache.layers[0]
        update = layer.update
        layer.update = lambda k, v, kw=None: returned.append(update(k, v, kw)) or returned[-1]
        with torch.no_grad():
            model(tokens[:, :40], past_key_values=cache)
            runner.compress(cache)
            model(tokens[:, 40:41], past_key_values=cache)   # q·Hq = 4 < H_kv·d = 32: latent values
            model(tokens[:, 41:60], past_key_values=cache)   # q·Hq = 76 ≥ 32: V rebuilt, plain tensors
    first, step, chunk = returned
    assert isinstance(first[0], torch.Tensor)  # nothing held before the prefill: the exact K/V as they are
    assert isinstance(step[0], CompressedKV) and isinstance(step[0].prefix, LatentPrefix)
    prefix = step[0].prefix
    assert prefix.length == 40 and [t.shape[-2] for t in prefix.latents] == [32, 8]  # merged, then own
    assert isinstance(chunk[0], torch.Tensor) and chunk[0].shape[-2] == 41 + 19


def test_latent_values_equal_rebuilt_values():
    from crosskv.methods.commonkv.attention import LatentPrefix

    model = tiny_model("qwen2")
    runner = make_method("commonkv", rank="48", unmerged_ratio="0", weights="uniform", recent_tokens="4").bind(model)
    _, cache = run(runner, model, ids(50), 44)
    layer = cache.layers[1]
    keys, values = layer.rebuild()                                    # (1, 2, S, 16)
    segments = layer.segments()
    prefix = LatentPrefix(tuple(layer.rebuild_keys(segments, layer.seen)), tuple(lat for lat, _ in segments),
                          layer.proj.up_v.weight, layer.proj.up_v.bias, 2)
    assert len(segments) == 2  # the group's merged entries, then the layer's own
    probs = torch.rand(1, 2, 3, keys.shape[-2]).softmax(-1)
    assert torch.allclose(prefix.apply(probs), probs @ values, atol=1e-5)
    q = torch.randn(1, 2, 3, 16)
    assert torch.allclose(prefix.scores(q), q @ keys.transpose(-1, -2))


def test_compressed_layer_under_another_attention_raises():
    from crosskv.cache.attention import PrefixChannelError

    model = tiny_model("llama")
    runner = make_method("commonkv", rank="48", unmerged_ratio="1").bind(model)
    tokens = ids(20)
    with runner.applied(), torch.no_grad():
        cache = runner.new_cache()
        model(tokens[:, :16], past_key_values=cache)
        model.set_attn_implementation("sdpa")  # someone swaps the attention function mid-run
        with pytest.raises(PrefixChannelError, match="cache layer 0"):
            model(tokens[:, 16:17], past_key_values=cache)
    assert model.config._attn_implementation == "sdpa"


def test_rope_tables_equal_the_models_rotary_and_are_released_after_each_forward():
    """Keys are rebuilt with the model's own RoPE from tables of one forward: none outlives it."""
    model = tiny_model("llama")
    tokens = ids(40)
    runner = make_method("commonkv", rank="40", unmerged_ratio="1").bind(model)
    _, cache = run(runner, model, tokens, 32)
    assert len(cache.rope) == 0 and not list(cache.rope.tensors())
    layer = cache.layers[0]
    positions = torch.tensor([17, 3, 0, 9], dtype=torch.int32)
    lat = torch.randn(1, 4, layer.proj.up_k.in_features)
    keys = layer.proj.up_k(lat).view(1, 4, layer.shape.kv_heads, layer.shape.head_dim).transpose(1, 2)
    got = layer.rebuild_keys([(lat, positions)], 18)[0]
    assert torch.allclose(got, runner.rotary.rotate(keys, positions.long()), atol=1e-6)


def test_rotate_keeps_the_dtype_and_matches_the_model():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from crosskv.core.capture import Rotary

    model = tiny_model("llama").to(torch.bfloat16)
    k = torch.randn(1, 2, 5, 16, dtype=torch.bfloat16)
    positions = torch.arange(5)
    cos, sin = model.model.rotary_emb(k, positions[None])
    _, expected = apply_rotary_pos_emb(k, k, cos, sin)
    got = Rotary(model).rotate(k, positions)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)


def test_method_bytes_counts_projections_minus_dropped_weights_in_model_dtype():
    from crosskv.methods.commonkv import nominal_method_bytes

    model = tiny_model("qwen2").to(torch.bfloat16)  # D = 64, H_kv·d = 32, 6 layers → groups of 4 and 2
    config = make_method("commonkv", rank="40", unmerged_ratio="1")
    runner = config.bind(model)
    params = [p for proj in runner.projections for m in (proj.down, proj.up_k, proj.up_v) for p in m.parameters()]
    assert {p.dtype for p in params} == {torch.bfloat16}  # no float32 factor copies kept
    added = (2 * 40 * 64 + 6 * 2 * 32 * 40 + 6 * 2 * 32) * 2    # P_g per group, R_k/R_v + biases per layer
    dropped = 6 * 2 * (32 * 64 + 32) * 2                          # k_proj/v_proj weights and biases
    assert runner.method_bytes() == added - dropped
    with runner.applied():
        assert runner.method_bytes() == added - dropped
    assert nominal_method_bytes(config, model.config, element_size=2)["net"] == added - dropped
    llama = nominal_method_bytes(make_method("commonkv"), kv_shape_config("llama-3.1-8b"), element_size=2)
    # kept=0.5 → r = 1856 for 8 groups of 4: P 8·1856·4096, R 32·2·1024·1856; dropped 32·2·1024·4096 (bf16)
    assert llama == {"added": 2 * (8 * 1856 * 4096 + 32 * 2 * 1024 * 1856), "droppable": 2 * 32 * 2 * 1024 * 4096,
                     "net": 2 * (8 * 1856 * 4096 + 32 * 2 * 1024 * 1856 - 32 * 2 * 1024 * 4096)}


def kv_shape_config(shape: str):
    from crosskv.core.models import random_config

    return random_config(shape, vocab=128256)


def test_group_store_lives_on_its_layers_device():
    """A fake two-device split: layers 2–3 on the meta device, the rest on the CPU (groups of 2)."""
    from crosskv.methods.commonkv import layer_devices, store_devices

    model = tiny_model("llama")
    for layer in model.model.layers[2:4]:
        layer.to("meta")
    runner = make_method("commonkv", group_size="2", rank="32", unmerged_ratio="0.5", weights="uniform").bind(model)
    attns = attention_modules(model)
    assert [d.type for d in layer_devices(attns)] == ["cpu", "cpu", "meta", "meta", "cpu", "cpu"]
    assert [d.type for d in store_devices(runner.groups, runner.devices)] == ["cpu", "meta", "cpu"]
    assert runner.projections[2].down.weight.device.type == "meta"  # the projections follow their layer
    with runner.applied():
        cache = runner.new_cache()
    assert [s.pos.device.type for s in cache.stores] == ["cpu", "meta", "cpu"]
    assert [layer.pos.device.type for layer in cache.layers] == ["cpu", "cpu", "meta", "meta", "cpu", "cpu"]


def test_crop_cuts_only_latents_appended_after_the_merge_and_reorder_is_refused():
    """The cache-layer base's crop on latents: tokens decoded after the merge go; merged/quantized ones stay."""
    model = tiny_model("llama")
    tokens = ids(60)
    for attend in ("rebuild", "buffer"):
        runner = make_method("commonkv", rank="40", unmerged_ratio="0.5", weights="uniform", sink_tokens="2",
                             recent_tokens="4", attend=attend).bind(model)
        _, cache = run(runner, model, tokens, 50)
        layer = cache.layers[0]
        held = layer.held()
        cache.crop(55)
        assert cache.get_seq_length() == 55 and layer.held() == held - 5 and layer.pos[-1] == 54
        assert layer.lat.untyped_storage().nbytes() == layer.lat.numel() * layer.lat.element_size()  # no pinning view
        if attend == "buffer":
            assert layer.buffer[0].shape[-2] == layer.held()
        with pytest.raises(ValueError, match="cannot crop a CommonKVLayer to 49 tokens: the first 50"):
            layer.crop(49)
        with pytest.raises(NotImplementedError, match="CommonKVLayer cannot reorder"):
            cache.reorder_cache(torch.tensor([0]))
        layer.reset()
        assert layer.get_seq_length() == layer.held() - len(layer.store) == 0 and list(layer.stored()) == []


@pytest.mark.parametrize("attend", ["rebuild", "buffer"])
def test_reset_forgets_merged_entries(attend):
    """After ``reset`` (the groups' merged latents included) a second prompt scores as on a fresh cache."""
    model = tiny_model("llama")
    runner = make_method("commonkv", unmerged_ratio="0.2", sink_tokens="2", recent_tokens="4", weights="uniform",
                         attend=attend).bind(model)
    first, second = ids(54, seed=2), ids(36, seed=3)
    with runner.applied(), torch.no_grad():
        cache = runner.new_cache()
        drive_cache(model, runner, cache, first[:, :48], first[:, 48:])
        assert sum(runner.merged_counts) > 0
        cache.reset()
        assert cache.get_seq_length() == 0 and held_bytes(cache) == kv_bytes(cache) == 0
        again = drive_cache(model, runner, cache, second[:, :30], second[:, 30:])
        assert held_bytes(cache) == kv_bytes(cache) > 0
        fresh_cache = runner.new_cache()
        fresh = drive_cache(model, runner, fresh_cache, second[:, :30], second[:, 30:])
    assert sum(runner.merged_counts) > 0 and kv_bytes(cache) == kv_bytes(fresh_cache)
    for a, b in zip(again, fresh):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
