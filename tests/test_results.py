"""The results store: keys, atomic writes, tidy loading."""
from __future__ import annotations

import json

import pytest

from crosskv.run import results


def record(key="k1", method="full", **extra):
    return {"key": key, "model": "m", "method": method, "params": {"rank": 8}, "task": "ppl", "context": 128,
            "options": {"corpus": "essays"}, "versions": {"torch": "x"}, "score": 3.0,
            "details": [{"index": 0, "nll": 1.0, "info": {"depth": 10}}], **extra}


def test_run_key_is_stable_and_sensitive(monkeypatch):
    def ident(dtype="bfloat16", params=None, task=None, device_type="cpu"):
        return results.identity("m", dtype, "svd", params or {"rank_k": 8, "rank_v": 12},
                                task or {"task": "ppl", "context": 128}, device_type=device_type)

    a = ident()
    b = results.identity("m", "bfloat16", "svd", {"rank_v": 12, "rank_k": 8}, {"context": 128, "task": "ppl"},
                         device_type="cpu")
    assert results.run_key(a) == results.run_key(b)
    for changed in (ident(dtype="float32"), ident(params={"rank_k": 9, "rank_v": 12}),
                    ident(task={"task": "ppl", "context": 256}), ident(device_type="cuda")):
        assert results.run_key(changed) != results.run_key(a)
    assert a["schema"] == results.SCHEMA_VERSION
    assert set(a["key_versions"]) == {"torch", "transformers", "kvpress"} and a["key_versions"]["torch"]
    for package in results.KEY_PACKAGES:  # another version of torch, transformers or kvpress: another key
        real = results._version
        monkeypatch.setattr(results, "_version", lambda p, package=package: "0.0-other" if p == package else real(p))
        assert results.run_key(ident()) != results.run_key(a), package
        monkeypatch.setattr(results, "_version", real)


def test_a_record_from_another_machine_is_served_without_its_timings():
    stored = {**record(), "kv_bytes": 123, "machine": "elsewhere · cuda: H100", "prefill_s": 0.5, "decode_tok_s": 40.0,
              "seconds": 9.0, "peak_mem_bytes": 10, "peak_mem_kind": "cuda_max_allocated",
              "details": [{"index": 0, "score": 1.0, "decode_s": 0.2, "prefill_s": 0.1}]}
    here = results.served(stored, "here · cpu: x86_64, 2 cores")
    assert here["score"] == stored["score"] and here["kv_bytes"] == stored["kv_bytes"]
    assert all(here[k] is None for k in ("prefill_s", "decode_tok_s", "seconds", "peak_mem_bytes", "peak_mem_kind"))
    assert here["details"] == [{"index": 0, "score": 1.0, "decode_s": None, "prefill_s": None}]
    assert here["timings_dropped"] == "elsewhere · cuda: H100"
    assert stored["decode_tok_s"] == 40.0  # the stored record itself is not changed
    assert results.served(stored, "elsewhere · cuda: H100") is stored  # same machine: served as measured
    assert results.served({**record(), "prefill_s": 1.0}, "here")["prefill_s"] is None  # no machine recorded


def test_save_and_load_roundtrip(tmp_path):
    path = results.save_record(record(), tmp_path)
    assert path == tmp_path / "k1.json"
    assert results.load_record("k1", tmp_path)["score"] == 3.0
    assert results.load_record("missing", tmp_path) is None
    assert [p.name for p in tmp_path.iterdir()] == ["k1.json"]


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", boom)
    with pytest.raises(KeyboardInterrupt):
        results.save_record(record(), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_results_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(results.ENV_VAR, str(tmp_path / "env"))
    assert results.results_dir() == tmp_path / "env"
    assert results.results_dir(tmp_path / "arg") == tmp_path / "arg"


def test_load_records_is_tidy_and_filters(tmp_path):
    results.save_record(record("k1", "full"), tmp_path)
    results.save_record(record("k2", "svd"), tmp_path)
    df = results.load_records(tmp_path)
    assert len(df) == 2 and "details" not in df.columns
    assert {"param.rank", "option.corpus", "version.torch"} <= set(df.columns)
    assert list(results.load_records(tmp_path, method="svd")["key"]) == ["k2"]
    assert list(results.load_records(tmp_path, method=["svd", "full"])["key"]) == ["k1", "k2"]
    assert results.load_records(tmp_path, no_such_column=1).empty
    assert results.load_records(tmp_path / "empty").empty
    samples = results.load_samples(tmp_path, method="full")
    assert list(samples["nll"]) == [1.0] and list(samples["info.depth"]) == [10]


def test_environment_reads_versions_without_importing_kvpress():
    import sys

    env = results.environment()
    assert env["versions"]["torch"] and env["versions"]["transformers"]
    if "kvpress" not in sys.modules:
        results.environment()
        assert "kvpress" not in sys.modules
