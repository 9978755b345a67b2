"""Shared fixtures: one embedded model per session (float32 for exactness tests, bfloat16 as run by default)."""
from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def model32():
    """The embedded SmolLM2-135M in float32 (exactness tests) → (model, tokenizer)."""
    import crosskv

    return crosskv.load_model("smollm2-135m", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def model16():
    """The embedded SmolLM2-135M in bfloat16, the default runtime dtype → (model, tokenizer)."""
    import crosskv

    return crosskv.load_model("smollm2-135m", device="cpu", dtype=torch.bfloat16)
