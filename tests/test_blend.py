"""The blend engine's properties on tiny random-weight Llama, Mistral, Qwen2 and Qwen3 models."""
from __future__ import annotations

import math

import pytest
import torch

from blend.forward import attend_and_mlp, causal_mask, logits_of, project_qkv, rope_for
from blend.prefill import compute_kv, fill_cache, keep_after_check
from blend.spec import BlendConfig, Sampling
from blend.prompt import Layout
from blend.rope import UnsupportedModel, check_blendable, rerotate_keys
from blend.select import CheckLayer, deviation, score, select_tokens
from blend.shapes import TINY_ARCHS, random_model
from tests.conftest import oracle_decode

ARCHS = pytest.mark.parametrize("arch", TINY_ARCHS)


def make_layout(n_chunks: int = 4, seed: int = 1, vocab: int = 512) -> Layout:
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    lengths = [7, 12, 9, 15, 5, 11][:n_chunks]
    return Layout(prefix=ids(6), chunks=[ids(n) for n in lengths], suffix=ids(8))


def run(engine, layout, mode, ratio=1.0, **cfg):
    kvs = engine.load_chunks(layout, mode, engine.memory_cache(layout))
    return engine.prefill(layout, mode, kvs, BlendConfig(ratio=ratio, **cfg))


def greedy(engine, result, n=20):
    return oracle_decode(engine.model, result, n, Sampling())


@ARCHS
def test_blend_at_ratio_one_equals_full_prefill(tiny_engines, arch):
    engine = tiny_engines[arch]
    layout = make_layout()
    full = run(engine, layout, "full")
    blend = run(engine, layout, "blend", ratio=1.0)
    assert (blend.logits - full.logits).abs().max().item() < 1e-4
    assert blend.recomputed_tokens == layout.n_chunk_tokens
    assert greedy(engine, blend) == greedy(engine, full)


@ARCHS
def test_single_chunk_full_prefix_reuse_agree(tiny_engines, arch):
    engine = tiny_engines[arch]
    layout = make_layout(n_chunks=1)
    full = run(engine, layout, "full").logits
    for mode in ("prefix", "reuse"):
        assert (run(engine, layout, mode).logits - full).abs().max().item() < 1e-4, mode


@ARCHS
def test_reuse_differs_from_full_with_several_chunks(tiny_engines, arch):
    """The cross-chunk attention that reuse drops is real; otherwise the tests above prove nothing."""
    engine = tiny_engines[arch]
    layout = make_layout()
    full = run(engine, layout, "full").logits
    assert (run(engine, layout, "reuse").logits - full).abs().max().item() > 1e-3


@ARCHS
def test_rerotated_cached_layer0_keys_equal_recomputed_keys(tiny_engines, arch):
    engine = tiny_engines[arch]
    layout = make_layout()
    prefix_kv = engine.prefix_kv(layout.prefix)
    chunk = layout.chunks[2]
    cached = engine.compute_chunk(layout.prefix, chunk)  # at its canonical start, after the prefix
    # The same tokens computed at their place in the prompt, after chunks 0 and 1.
    before = layout.prefix + layout.chunks[0] + layout.chunks[1]
    empty = prefix_kv[:, :, :, :0]
    at_place = compute_kv(engine.parts, empty, before + chunk)[:, :, :, len(before):]
    delta = layout.chunk_starts[2] - cached.start
    assert delta > 0
    moved = rerotate_keys(cached.kv[0, 0], delta, engine.parts.inv_freq)
    assert (moved - at_place[0, 0]).abs().max().item() < 1e-5
    assert (cached.kv[0, 0] - at_place[0, 0]).abs().max().item() > 1e-3  # positions do matter
    assert torch.equal(cached.kv[0, 1], at_place[0, 1]) or (cached.kv[0, 1] - at_place[0, 1]).abs().max() < 1e-6


@ARCHS
def test_prefix_and_first_chunk_kv_equal_full_prefill(tiny_engines, arch):
    """The premise of every selection (select.score ranks the first chunk last): before any
    compute, the fused cache already holds full prefill's KV for the prompt head and the first
    chunk (issue 21 asked whether a Qwen floor came from there; it did not)."""
    engine = tiny_engines[arch]
    layout = make_layout()
    full = run(engine, layout, "full")
    kvs = engine.load_chunks(layout, "reuse", engine.memory_cache(layout))
    stale = fill_cache(engine.parts, layout, engine.prefix_kv(layout.prefix), kvs)
    exact = layout.chunk_starts[0] + len(layout.chunks[0])
    assert (stale[:, :, :, :exact] - full.kv[:, :, :, :exact]).abs().max().item() < 1e-5
    later = slice(exact, layout.suffix_start)
    assert (stale[:, :, :, later] - full.kv[:, :, :, later]).abs().max().item() > 1e-3  # the rest is stale


@ARCHS
def test_blend_recomputing_every_chunk_but_the_first_equals_full(tiny_engines, arch):
    """At the ratio that spends the budget on exactly the chunks after the first, nothing stale is
    left: blend is full prefill. So what a ratio below 1 leaves is only in chunks 2…k."""
    engine = tiny_engines[arch]
    layout = make_layout()
    full = run(engine, layout, "full")
    n_first, n_chunk = len(layout.chunks[0]), layout.n_chunk_tokens
    for selection in ("value", "lookahead"):
        res = run(engine, layout, "blend", ratio=(n_chunk - n_first) / n_chunk, check_layer=1, selection=selection)
        assert res.recomputed_tokens == n_chunk - n_first
        assert (res.logits - full.logits).abs().max().item() < 1e-4, selection
        assert (res.kv - full.kv).abs().max().item() < 1e-4, selection


def test_selection_keeps_exactly_top_deviations_plus_suffix():
    torch.manual_seed(0)
    heads, dim, lo, hi, n = 2, 4, 5, 25, 30  # positions: prefix 0-4, chunks 5-24, suffix 25-29
    q = torch.randn(1, heads, n - lo, dim)
    k = torch.randn(1, heads, n - lo, dim)
    v = torch.randn(1, heads, n - lo, dim)
    cached = torch.randn(2, heads, n, dim)
    check = CheckLayer(q, k, v, cached, 0, hi - lo, lo, [hi - lo], 0.5)
    keep = keep_after_check(check, score("value", check), math.ceil(0.3 * (hi - lo)))
    dev = ((v[0] - cached[1][:, lo:n]) ** 2).sum(dim=(0, 2))[: hi - lo]
    expected_chunk = set(torch.topk(dev, math.ceil(0.3 * (hi - lo))).indices.tolist())
    kept = keep.tolist()
    suffix = set(range(hi - lo, n - lo))
    assert kept == sorted(kept) and len(kept) == len(set(kept))
    assert suffix <= set(kept)
    assert set(kept) - suffix == expected_chunk


def test_select_tokens_counts_and_order():
    dev = torch.tensor([0.1, 5.0, 0.3, 4.0, 0.2, 3.0])
    assert select_tokens(dev, 0.5).tolist() == [1, 3, 5]
    assert select_tokens(dev, 0.0).numel() == 0
    assert select_tokens(dev, 1.0).tolist() == list(range(6))
    assert deviation(torch.ones(1, 2, 3, 4), torch.zeros(1, 2, 3, 4)).tolist() == [8.0, 8.0, 8.0]
    with pytest.raises(ValueError):
        select_tokens(dev, 1.5)


@ARCHS
def test_blend_recomputes_selected_and_keeps_the_rest_cached(tiny_engines, arch):
    engine = tiny_engines[arch]
    layout = make_layout()
    kvs = engine.load_chunks(layout, "blend", engine.memory_cache(layout))
    result = engine.prefill(layout, "blend", kvs, BlendConfig(ratio=0.3, check_layer=1))
    assert result.recomputed_tokens == math.ceil(0.3 * layout.n_chunk_tokens)
    last = engine.parts.n_layers - 1
    # Unselected chunk tokens keep their cached values in the layers after the check layer.
    same = 0
    for start, ckv in zip(layout.chunk_starts, kvs):
        fused = result.kv[last, 1, :, start:start + ckv.n_tokens]
        same += int((fused == ckv.kv[last, 1]).all(dim=(0, 2)).sum())
    assert same == layout.n_chunk_tokens - result.recomputed_tokens


def reference_blend(engine, layout, kvs, cfg: BlendConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """CacheBlend computed the slow, obvious way: every token through every layer, where after the
    check layer the unselected tokens' K/V are overwritten by their cached (re-rotated) values
    before attention. The selected tokens see exactly what the engine's subset computation sees."""
    parts = engine.parts
    n, P, S = layout.n_tokens, layout.n_prefix, layout.suffix_start
    cached = fill_cache(parts, layout, engine.prefix_kv(layout.prefix), kvs)
    pos = torch.arange(n)
    cos, sin = rope_for(parts, pos)
    mask = causal_mask(pos, n)
    h = parts.embed(torch.tensor(layout.ids()))[None]
    use_cached, final = None, torch.empty_like(cached)
    for i, layer in enumerate(parts.layers):
        q, k, v = project_qkv(layer, h, cos, sin, parts.head_dim)
        if i == cfg.check_layer:
            check = CheckLayer(q, k, v, cached[i], P, S, 0, [len(c) for c in layout.chunks],
                               layer.self_attn.scaling)
            chosen = select_tokens(score(cfg.selection, check), cfg.ratio) + P
            use_cached = torch.ones(n, dtype=torch.bool)
            use_cached[chosen] = False
            use_cached[S:] = False
        elif use_cached is not None:
            k = torch.where(use_cached[:, None], cached[i, 0][None], k)
            v = torch.where(use_cached[:, None], cached[i, 1][None], v)
        final[i, 0], final[i, 1] = k[0], v[0]
        h = attend_and_mlp(layer, h, q, k, v, mask)
    return logits_of(parts, h[:, -1]), final


@ARCHS
@pytest.mark.parametrize("ratio,check_layer,selection", [(0.15, 1, "value"), (0.4, 0, "value"), (0.4, 1, "value"),
                                                         (0.15, 1, "key"), (0.15, 1, "attention"),
                                                         (0.4, 0, "hybrid"), (0.15, 1, "hybrid"), (0.15, 1, "first")])
def test_blend_equals_the_obvious_computation(tiny_engines, arch, ratio, check_layer, selection):
    engine = tiny_engines[arch]
    layout = make_layout()
    kvs = engine.load_chunks(layout, "blend", engine.memory_cache(layout))
    cfg = BlendConfig(ratio=ratio, check_layer=check_layer, selection=selection)
    with torch.inference_mode():
        logits, kv = reference_blend(engine, layout, kvs, cfg)
    result = engine.prefill(layout, "blend", kvs, cfg)
    assert (result.logits - logits).abs().max().item() < 1e-4
    assert (result.kv - kv).abs().max().item() < 1e-4


@ARCHS
def test_blend_quality_improves_with_ratio(tiny_engines, arch):
    engine = tiny_engines[arch]
    layout = make_layout()
    full = torch.log_softmax(run(engine, layout, "full").logits, -1)

    def kl(mode, ratio=1.0):
        logp = torch.log_softmax(run(engine, layout, mode, ratio).logits, -1)
        return float((full.exp() * (full - logp)).sum())

    assert kl("blend", 1.0) < 1e-6
    assert kl("blend", 0.5) < kl("reuse")


@ARCHS
def test_greedy_from_blend_cache_equals_transformers_generate(tiny_engines, arch):
    engine = tiny_engines[arch]
    layout = make_layout()
    ours = greedy(engine, run(engine, layout, "blend", ratio=1.0), 20)
    ids = torch.tensor([layout.ids()])
    ref = engine.model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                                eos_token_id=None, pad_token_id=0)
    assert ours == ref[0, ids.shape[1]:].tolist()


def test_check_layer_options_run(tiny_engines):
    engine = tiny_engines["tiny-llama"]
    layout = make_layout()
    for cfg in (dict(check_layer=0), dict(check_layer=3)):
        res = run(engine, layout, "blend", ratio=0.2, **cfg)
        assert res.recomputed_tokens == math.ceil(0.2 * layout.n_chunk_tokens)
    with pytest.raises(ValueError, match="selection"):
        BlendConfig(selection="both")
    with pytest.raises(ValueError, match="check_layer"):
        run(engine, layout, "blend", ratio=0.2, check_layer=4)
    with pytest.raises(ValueError, match="mode"):
        run(engine, layout, "fast")


def test_sampling_is_seeded(tiny_engines):
    engine = tiny_engines["tiny-llama"]
    layout = make_layout()
    res = run(engine, layout, "blend", ratio=1.0)
    s = Sampling(temperature=1.0, top_p=0.9, seed=7)
    assert oracle_decode(engine.model, res, 10, s) == oracle_decode(engine.model, res, 10, s)


def test_unblendable_models_are_refused():
    sliding = random_model("tiny-mistral")
    sliding.config.sliding_window = 16
    with pytest.raises(UnsupportedModel, match="sliding"):
        check_blendable(sliding, n_tokens=64)
    check_blendable(sliding, n_tokens=16)  # a prompt inside the window attends fully: fine
    dynamic = random_model("tiny-llama")
    dynamic.config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}
    with pytest.raises(UnsupportedModel, match="dynamic"):
        check_blendable(dynamic)
