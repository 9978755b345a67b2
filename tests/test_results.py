"""The results store: keys, atomic writes, tidy loading."""
from __future__ import annotations

import json

import pytest

from crosskv.run import results


def record(key="k1", method="full", **extra):
    return {"key": key, "model": "m", "method": method, "params": {"rank": 8}, "task": "ppl", "context": 128,
            "options": {"corpus": "essays"}, "versions": {"torch": "x"}, "score": 3.0,
            "details": [{"index": 0, "nll": 1.0, "info": {"depth": 10}}], **extra}


def test_run_key_is_stable_and_sensitive():
    a = results.identity("m", "bfloat16", "svd", {"rank_k": 8, "rank_v": 12}, {"task": "ppl", "context": 128})
    b = results.identity("m", "bfloat16", "svd", {"rank_v": 12, "rank_k": 8}, {"context": 128, "task": "ppl"})
    assert results.run_key(a) == results.run_key(b)
    for changed in (results.identity("m", "float32", "svd", {"rank_k": 8, "rank_v": 12}, a["task"]),
                    results.identity("m", "bfloat16", "svd", {"rank_k": 9, "rank_v": 12}, a["task"]),
                    results.identity("m", "bfloat16", "svd", a["params"], {"task": "ppl", "context": 256})):
        assert results.run_key(changed) != results.run_key(a)
    assert a["schema"] == results.SCHEMA_VERSION


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
