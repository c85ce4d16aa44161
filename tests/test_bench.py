"""`ragblend bench` on the tiny shape: CI runs the benchmark code the GPU numbers come from."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import run_cli


def test_bench_tiny_on_cpu_writes_every_mode_ratio_tier_and_format_with_the_served_default_first(tmp_path):
    cmd = [sys.executable, "-m", "api.cli", "bench", "--shape", "tiny", "--device", "cpu", "--chunks", "3",
           "--chunk-tokens", "32", "--question-tokens", "8", "--ratios", "0.15,0.5", "--tiers", "cpu,lmdb",
           "--kv-dtype", "int8,bf16", "--sweep", "128,256", "--runs", "2", "--warmup", "1", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["prompt_tokens"] == 32 + 3 * 32 + 8
    assert result["kv_formats"] == ["int8", "bfloat16"]
    assert result["served"] == {"tier": "lmdb:int8", "mode": "blend", "ratio": 0.15, "check_layer": 1,
                                "selection": "lookahead", "later_checks": [], "max_ratio": 0.5}
    rows = [r for r in result["rows"] if not r.get("served_default")]
    expected = {("full", None, None)} | {(m, r, t) for t in ("cpu", "lmdb:int8", "lmdb:bfloat16")
                                         for m, r in (("prefix", None), ("reuse", None), ("blend", 0.15), ("blend", 0.5))}
    assert {(r["mode"], r["ratio"], r["tier"]) for r in rows} == expected and len(rows) == len(expected)
    served = [r for r in result["rows"] if r.get("served_default")]
    assert len(served) == 1 and (served[0]["tier"], served[0]["ratio"], served[0]["selection"]) == ("lmdb:int8", 0.15,
                                                                                                    "lookahead")
    full = next(r for r in result["rows"] if r["mode"] == "full")["median_ms"]
    for r in result["rows"]:
        assert r["median_ms"] > 0 and r["p90_ms"] >= r["median_ms"] and r["runs"] == 2
        assert abs(r["speedup_vs_full"] - full / r["median_ms"]) < 1e-9
    assert [s["tokens"] for s in result["sweep"]] == [32 + 2 * 32 + 8, 32 + 6 * 32 + 8]
    assert (tmp_path / "bench.md").exists() and (tmp_path / "sweep.png").stat().st_size > 0
    table = done.stdout.splitlines()
    first_row = next(i for i, line in enumerate(table) if line.startswith("| blend") or line.startswith("| full"))
    assert "DEFAULT SERVED" in table[first_row] and "| blend | 0.15 | lmdb:bfloat16 |" in done.stdout


def test_bench_refuses_unknown_shapes_and_tiers(tmp_path):
    for extra in (["--shape", "gpt-9"], ["--tiers", "disk"], ["--ratios", "1.5"], ["--kv-dtype", "int3"]):
        done = run_cli("bench", "--device", "cpu", "--out", str(tmp_path), *extra)  # refused before any work
        assert done.returncode == 2 and "error:" in done.stderr, (extra, done.stderr)
    assert not (tmp_path / "bench.json").exists()


def test_bench_serve_tiny_on_cpu_writes_every_rate_mode_and_batching(tmp_path):
    cmd = [sys.executable, "-m", "api.cli", "bench-serve", "--shape", "tiny", "--device", "cpu", "--chunks", "3",
           "--chunk-tokens", "16", "--question-tokens", "8", "--output-tokens", "6", "--pool", "6",
           "--requests", "4", "--rates", "50,500", "--max-batch", "4", "--step-batches", "1,4",
           "--step-contexts", "64", "--goodput", "6", "--goodput-requests", "6", "--burst", "4", "--goodput-runs", "2",
           "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "serve.json").read_text())
    rows = {(r["rate"], r["mode"], r["max_batch"]) for r in result["loads"]}
    assert rows == {(rate, m, b) for rate in (50.0, 500.0) for m in ("full", "blend") for b in (4, 1)}
    for r in result["loads"]:
        assert r["requests"] == 4 and r["tokens_per_s"] > 0 and r["ttft_p99_ms"] >= r["ttft_p50_ms"] > 0
        assert r["mean_batch"] <= r["max_batch"]
    assert [(s["batch"], s["context"]) for s in result["steps"]] == [(1, 64), (4, 64)]
    assert [(g["mode"], g["output_tokens"]) for g in result["goodput"]] == [("full", 6), ("blend", 6)]
    for g in result["goodput"]:  # every rate judged on a whole run of the asked size
        assert g["saturation"] > 0 and len(g["runs"]) == 2 and all(r["requests"] == 6 for r in g["runs"])
        assert g["goodput"] == max([r["rate"] for r in g["runs"] if r["met"]], default=0.0)
    assert (tmp_path / "serve.md").exists() and (tmp_path / "serve.png").stat().st_size > 0


def test_bench_serve_refuses_bad_rates_and_modes(tmp_path):
    for extra in (["--rates", "0"], ["--modes", "fast"], ["--pool", "2"], ["--step-batches", "x"]):
        done = run_cli("bench-serve", "--out", str(tmp_path), *extra)
        assert done.returncode == 2 and "error:" in done.stderr, (extra, done.stderr)
    assert not (tmp_path / "serve.json").exists()


def test_goodput_search_brackets_the_highest_rate_that_holds():
    from blend.goodput import Targets, search

    def run(rate: float) -> dict:  # a server that keeps its targets up to 7.3 requests/s
        return {"rate": rate, "ttft_p99_ms": 200.0 if rate <= 7.3 else 3000.0, "tpot_p99_ms": 20.0}
    found = search(run, saturation=10.0, targets=Targets(), max_runs=12, precision=0.02)
    assert found.rate <= 7.3 < found.failed_at and found.failed_at - found.rate <= 0.02 * found.rate
    assert len(found.runs) < 12  # it stopped once the bracket was narrow
    slow = search(lambda r: {"rate": r, "ttft_p99_ms": 10.0, "tpot_p99_ms": 80.0}, 10.0, Targets(), max_runs=3)
    assert slow.rate == 0.0 and slow.failed_at is not None  # nothing held: said so, not extrapolated


def test_the_served_rows_cache_keeps_what_a_request_read_and_cooling_empties_only_its_device_tier(tmp_path):
    """The headline row reads through a cache with a device tier, as `serve` has (so the stream
    lands and keeps the chunks, on the request's path), and cool() makes the next run cold again
    while the store keeps every entry."""
    import torch

    from blend.bench import SERVED_TIER, BenchConfig, Tiers, random_layout, served_spec, ttft
    from blend.engine import Engine
    from blend.loader import LoadedModel, fingerprint
    from blend.shapes import random_model

    model = random_model("tiny-llama", seed=0)
    engine = Engine(LoadedModel(model, None, "tiny-llama", fingerprint(model)))
    layout = random_layout(model.config.vocab_size, 3, 16, 4)
    tiers = Tiers(engine, layout, ["lmdb"], [SERVED_TIER.split(":")[1]], tmp_path, whole=True)
    try:
        served = tiers.served
        assert served is not None and all(served.gpu.get(k) is None for k in tiers.served_keys)
        first = ttft(engine, layout, served_spec(BenchConfig(device="cpu")), served)
        assert all(served.gpu.get(k) is not None for k in tiers.served_keys)
        tiers.cool()
        assert all(served.gpu.get(k) is None for k in tiers.served_keys)
        assert all(served.contains(k) for k in tiers.served_keys)
        again = ttft(engine, layout, served_spec(BenchConfig(device="cpu")), served)
        assert again.token_ids == first.token_ids and torch.equal(again.first_logits, first.first_logits)
    finally:
        tiers.close()
