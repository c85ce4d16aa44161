"""Token selection as a policy: every selector spends exactly its budget, is exact at r = 1, and
the attention selectors score what the model's own attention says; gradual filtering over
several check layers spends exactly the budget of one."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from blend.forward import attend_and_mlp, causal_mask, project_qkv, rope_for
from blend.spec import BlendConfig
from blend.select import SELECTIONS, CheckLayer, score
from blend.shapes import TINY_ARCHS, random_model

from tests.test_blend import make_layout, run

SEL = pytest.mark.parametrize("selection", SELECTIONS)


@SEL
@pytest.mark.parametrize("ratio", [0.05, 0.3])
def test_every_selector_keeps_exactly_its_budget_plus_the_question(tiny_engines, selection, ratio):
    engine = tiny_engines["tiny-qwen2"]
    layout = make_layout()
    res = run(engine, layout, "blend", ratio=ratio, selection=selection)
    budget = math.ceil(ratio * layout.n_chunk_tokens)
    assert res.recomputed_tokens == budget
    assert res.selected.ratio == ratio
    # the question's tokens flowed to the end: the decode cache holds their fresh K/V, which a
    # reuse prefill (the suffix alone computed) produces too
    reuse = run(engine, layout, "reuse")
    last, S = engine.parts.n_layers - 1, layout.suffix_start
    assert res.kv[last, :, :, S:].shape == reuse.kv[last, :, :, S:].shape


@SEL
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_every_selector_at_ratio_one_equals_full(tiny_engines, arch, selection):
    engine = tiny_engines[arch]
    layout = make_layout()
    full = run(engine, layout, "full")
    blend = run(engine, layout, "blend", ratio=1.0, selection=selection)
    assert (blend.logits - full.logits).abs().max().item() < 1e-4


def test_no_selector_spends_budget_on_the_exact_first_chunk(tiny_engines):
    engine = tiny_engines["tiny-llama"]
    layout = make_layout()
    first = layout.chunks[0]
    for selection in SELECTIONS:
        res = run(engine, layout, "blend", ratio=0.3, selection=selection)
        kvs = engine.load_chunks(layout, "blend", engine.memory_cache(layout))
        last = engine.parts.n_layers - 1
        P = layout.n_prefix
        # the first chunk's cached K/V stay in place: nothing of it was recomputed
        assert torch.equal(res.kv[last, 1, :, P:P + len(first)], kvs[0].kv[last, 1]), selection


def test_first_selects_the_leading_tokens_of_every_later_chunk():
    lengths = [4, 6, 5, 7]
    C = sum(lengths)
    q = k = v = torch.zeros(1, 1, C + 2, 2)
    check = CheckLayer(q, k, v, torch.zeros(2, 1, C + 2, 2), 0, C, 0, lengths, 1.0)
    s = score("first", check)
    top = set(torch.topk(s, 6).indices.tolist())
    assert top == {4, 5, 10, 11, 15, 16}  # offsets 0 and 1 of chunks 2, 3, 4


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen3"])
def test_attention_scores_equal_the_models_own_question_to_chunk_attention(arch):
    """The question's attention mass per chunk token at the check layer, against the attention
    probabilities transformers' eager attention returns for the same prompt."""
    model = random_model(arch, seed=0, std=0.1)
    model.set_attn_implementation("eager")
    from blend.forward import model_parts
    parts = model_parts(model)
    layout = make_layout()
    P, S, n, c = layout.n_prefix, layout.suffix_start, layout.n_tokens, 1
    ids = torch.tensor([layout.ids()])
    with torch.inference_mode():
        attn = model(input_ids=ids, output_attentions=True).attentions[c][0]  # [Hq, N, N]
        expected = attn[:, S:, P:S].sum(dim=(0, 1))
        pos = torch.arange(n)
        cos, sin = rope_for(parts, pos)
        h = parts.embed(ids)
        for i, layer in enumerate(parts.layers):
            q, k, v = project_qkv(layer, h, cos, sin, parts.head_dim)
            if i == c:
                break
            h = attend_and_mlp(layer, h, q, k, v, causal_mask(pos, n))
        check = CheckLayer(q, k, v, torch.zeros(2, k.shape[1], n, k.shape[3]), P, S, 0,
                           [len(x) for x in layout.chunks], layer.self_attn.scaling)
        got = check.question_attention()
    assert got.shape == expected.shape
    assert torch.allclose(got, expected.float(), atol=1e-5)
    assert expected.sum() > 0.1  # the question does look at the chunks


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen3"])
def test_lookahead_scores_equal_the_question_attention_over_the_next_layers_cached_keys(arch):
    """question_states equals the model's own hidden states after the check layer, and the
    lookahead mass equals an explicit softmax of those states' queries at each probed layer over
    that layer's cached (re-rotated) prefix + chunk keys."""
    from blend.engine import Engine
    from blend.loader import LoadedModel, fingerprint
    from blend.lookahead import lookahead_attention, probe_layers, question_states
    from blend.prefill import fill_cache

    model = random_model(arch, seed=0, std=0.1)
    engine = Engine(LoadedModel(model, None, arch, fingerprint(model)))
    parts = engine.parts
    layout = make_layout()
    P, S, n, c = layout.n_prefix, layout.suffix_start, layout.n_tokens, 1
    ids = torch.tensor([layout.ids()])
    with torch.inference_mode():
        expected_h = model(input_ids=ids, output_hidden_states=True).hidden_states[c + 1][:, S:]
        pos = torch.arange(n)
        cos, sin = rope_for(parts, pos)
        h = parts.embed(ids)
        for i, layer in enumerate(parts.layers):
            q, k, v = project_qkv(layer, h, cos, sin, parts.head_dim)
            if i == c:
                break
            h = attend_and_mlp(layer, h, q, k, v, causal_mask(pos, n))
        hq = question_states(layer, h, q, k, v, S, pos)
        assert torch.allclose(hq, expected_h, atol=1e-5)
        kvs = engine.load_chunks(layout, "reuse", engine.memory_cache(layout))
        cache = fill_cache(parts, layout, engine.prefix_kv(layout.prefix), kvs)
        layers = probe_layers(parts.n_layers, c)
        got = lookahead_attention(parts, hq, cos[S:], sin[S:], layers, lambda r: cache[r.start:r.stop, 0, :, :S], P, S)
        expected = torch.zeros(S - P)
        for i in layers:
            lq, _, _ = project_qkv(parts.layers[i], expected_h, cos[S:], sin[S:], parts.head_dim)
            keys = cache[i, 0, :, :S]
            keys = keys.repeat_interleave(lq.shape[1] // keys.shape[0], dim=0)
            probs = (lq[0] @ keys.transpose(1, 2) * parts.layers[i].self_attn.scaling).softmax(-1)
            expected += probs[:, :, P:S].sum(dim=(0, 1))
    assert len(layers) > 0
    assert torch.allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_probes_batched_queries_are_each_layers_own_bit_for_bit(arch, dtype):
    """probe_queries (one RMS statistic and one rotation for every probed layer) gives exactly
    what project_q gives layer by layer, so batching the probe changes no selection."""
    from blend.forward import model_parts, project_q
    from blend.lookahead import probe_layers, probe_queries

    parts = model_parts(random_model(arch, seed=1, std=0.1, dtype=dtype))
    g = torch.Generator().manual_seed(0)
    hq = torch.randn(1, 7, parts.embed.weight.shape[1], generator=g).to(dtype)
    cos, sin = rope_for(parts, torch.arange(40, 47))
    layers = probe_layers(parts.n_layers, 0)
    with torch.inference_mode():
        got = probe_queries(parts, layers, hq, cos, sin)
        want = torch.stack([project_q(parts.layers[i], hq, cos, sin, parts.head_dim)[0] for i in layers])
    assert len(layers) > 1 and got.shape == want.shape
    assert torch.equal(got, want)


def question_attention_of_the_model(model, layout, stale: torch.Tensor, n_scored: int) -> torch.Tensor:
    """The question's attention over the stale KV as transformers' own eager attention computes it:
    the suffix fed after a DynamicCache holding `stale` [L, 2, H, S, D] (prefix + re-rotated
    chunks), at its true positions; InfoFlow's score over the last `n_scored` layers."""
    from transformers import DynamicCache

    P, S, n = layout.n_prefix, layout.suffix_start, layout.n_tokens
    cache = DynamicCache(config=model.config)
    for i in range(stale.shape[0]):
        cache.update(stale[i, 0][None].clone(), stale[i, 1][None].clone(), i)
    out = model(input_ids=torch.tensor([layout.suffix]), past_key_values=cache, output_attentions=True,
                position_ids=torch.arange(S, n)[None], use_cache=True)
    total = torch.zeros(S - P, dtype=torch.float64)
    for a in out.attentions[-n_scored:]:                      # [1, Hq, Tq, N]
        total += a[0].double().mean(dim=0)[:, P:S].square().sum(dim=0)
    return total.sqrt()


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen2", "tiny-qwen3"])
@pytest.mark.parametrize("n_scored", [1, 2])
def test_question_scores_equal_the_models_own_attention_over_the_stale_kv(arch, n_scored):
    from blend.engine import Engine
    from blend.loader import LoadedModel, fingerprint
    from blend.prefill import fill_cache, to_device
    from blend.question import question_pass

    model = random_model(arch, seed=0, std=0.1)
    model.set_attn_implementation("eager")
    engine = Engine(LoadedModel(model, None, arch, fingerprint(model)))
    parts, layout = engine.parts, make_layout()
    P, S = layout.n_prefix, layout.suffix_start
    with torch.inference_mode():
        kvs = engine.load_chunks(layout, "reuse", engine.memory_cache(layout))
        kv = fill_cache(parts, layout, engine.prefix_kv(layout.prefix), kvs)
        stale = kv[:, :, :, :S].clone()
        got = question_pass(parts, to_device(layout.ids(), parts.device), kv, S, P, S, n_scored)
        expected = question_attention_of_the_model(model, layout, stale, n_scored)
    assert got.shape == expected.shape
    assert torch.allclose(got.double(), expected, atol=1e-5, rtol=1e-4)
    assert expected.max() > 0.05  # the question does look at the chunks


def test_question_selection_recomputes_the_chunk_tokens_the_question_attends_most(tiny_engines):
    engine = tiny_engines["tiny-llama"]
    layout = make_layout()
    res = run(engine, layout, "blend", ratio=0.3, selection="question")
    from blend.prefill import fill_cache, to_device
    from blend.question import question_pass
    P, S = layout.n_prefix, layout.suffix_start
    with torch.inference_mode():
        kvs = engine.load_chunks(layout, "reuse", engine.memory_cache(layout))
        kv = fill_cache(engine.parts, layout, engine.prefix_kv(layout.prefix), kvs)
        s = question_pass(engine.parts, to_device(layout.ids(), engine.parts.device), kv, S, P, S)
        s[:len(layout.chunks[0])] = float("-inf")  # the exact first chunk is never chosen
    want = set((torch.topk(s, math.ceil(0.3 * layout.n_chunk_tokens)).indices + P).tolist())
    last = engine.parts.n_layers - 1
    reuse = run(engine, layout, "reuse")
    changed = {P + j for j in range(S - P)
               if not torch.equal(res.kv[last, 1, :, P + j], reuse.kv[last, 1, :, P + j])}
    assert changed == want


@pytest.fixture(scope="module")
def deep():
    from blend.engine import Engine
    from blend.loader import LoadedModel, fingerprint

    model = random_model("tiny-deep", seed=0, std=0.1)
    return Engine(LoadedModel(model, None, "tiny-deep", fingerprint(model)))


def chunk_token_layers(engine, layout, monkeypatch, **cfg) -> tuple[list[int], object]:
    """The chunk tokens each layer computed (attention and MLP), counted where they run."""
    import blend.prefill as prefill

    seen, real = [], prefill.attend_and_mlp
    n_suffix = len(layout.suffix)

    def counting(layer, h, *a, **k):
        seen.append(h.shape[1] - n_suffix)
        return real(layer, h, *a, **k)
    kvs = engine.load_chunks(layout, "blend", engine.memory_cache(layout))  # chunk precompute uncounted
    engine.prefix_kv(layout.prefix)
    monkeypatch.setattr(prefill, "attend_and_mlp", counting)
    res = engine.prefill(layout, "blend", kvs, BlendConfig(**cfg))
    monkeypatch.setattr(prefill, "attend_and_mlp", real)
    return seen, res


@SEL
@pytest.mark.parametrize("ratio,checks", [(0.05, (2, 5)), (0.15, (1, 4)), (0.3, (1, 3, 6))])
def test_gradual_filtering_keeps_exactly_its_budget(deep, monkeypatch, selection, ratio, checks):
    engine, layout = deep, make_layout(n_chunks=6)
    L, C = engine.parts.n_layers, layout.n_chunk_tokens
    single, _ = chunk_token_layers(engine, layout, monkeypatch, ratio=ratio, selection=selection,
                                   check_layer=checks[0])
    seen, res = chunk_token_layers(engine, layout, monkeypatch, ratio=ratio, selection=selection,
                                   check_layer=checks[0], later_checks=checks[1:])
    after = checks[0]  # layers before c₁ compute every token (the prefix too)
    budget = math.ceil(ratio * C) * (L - after)
    assert sum(single[after:]) == budget
    assert sum(seen[after:]) == budget
    assert seen[:after] == single[:after]
    counts = res.selected.counts
    assert len(counts) == len(checks) and counts == sorted(counts, reverse=True)
    assert res.recomputed_tokens == counts[-1]


def test_gradual_filtering_widens_first_where_the_spans_allow(deep, monkeypatch):
    engine, layout = deep, make_layout(n_chunks=6)
    seen, res = chunk_token_layers(engine, layout, monkeypatch, ratio=0.15, selection="value",
                                   check_layer=1, later_checks=(4,))
    n = math.ceil(0.15 * layout.n_chunk_tokens)
    assert res.selected.counts[0] > n > res.selected.counts[1]
    assert seen[1:4] == [res.selected.counts[0]] * 3 and seen[4:] == [res.selected.counts[1]] * 6


def test_gradual_counts_are_non_increasing_and_spend_the_single_check_budget():
    from blend.select import gradual_counts
    for L in (10, 24, 30, 32):
        for C in (40, 300, 1000):
            for r in (0.0, 0.05, 0.15, 0.3, 1.0):
                for checks in [(1, L // 4), (1, 8, 16), (0, 2), (1, L - 2)]:
                    counts = gradual_counts(C, r, checks, L)
                    n = math.ceil(r * C - 1e-9)
                    spans = [b - a for a, b in zip(checks, [*checks[1:], L])]
                    assert sum(c * s for c, s in zip(counts, spans)) == n * (L - checks[0])
                    assert counts == sorted(counts, reverse=True) and counts[0] <= C
    # as near 2r as the spans allow over layers 1…7, then what is left over layers 8…29
    assert gradual_counts(1000, 0.15, (1, 8), 30) == [282, 108]


@SEL
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_gradual_filtering_at_ratio_one_equals_full(tiny_engines, arch, selection):
    engine = tiny_engines[arch]
    layout = make_layout()
    full = run(engine, layout, "full")
    blend = run(engine, layout, "blend", ratio=1.0, selection=selection, later_checks=(2,))
    assert (blend.logits - full.logits).abs().max().item() < 1e-4


def test_blend_config_refuses_check_layers_out_of_order_and_a_later_one_past_the_model():
    from blend.spec import BadQuery, QuerySpec
    for bad in ("3,1", "1,1", "", "1,x"):
        with pytest.raises(BadQuery, match="check_layers"):
            BlendConfig.with_checks(bad)
    with pytest.raises(BadQuery, match="question_layers"):
        BlendConfig(question_layers=0)
    cfg = BlendConfig.with_checks("1,8")
    assert cfg.check_layers == (1, 8)
    with pytest.raises(BadQuery, match="below the model's 4 layers"):
        QuerySpec(blend=cfg).check_model(4)


def _split_model_installed(name: str) -> bool:
    import importlib.util

    from blend.loader import SPLIT_MODELS
    return all(importlib.util.find_spec(p) is not None for p in SPLIT_MODELS[name].packages)


@pytest.mark.skipif(not _split_model_installed("qwen2.5-coder-0.5b"),
                    reason="Qwen2.5-Coder-0.5B not installed (make qwen)")
def test_every_selection_at_ratio_one_equals_full_on_qwen_coder():
    """The second real model (Qwen2: attention bias, 14 query heads over 2 KV heads, 24 layers),
    with gradual filtering too, on real chunks of the sample corpus."""
    from blend.engine import Engine
    from blend.loader import load_model

    engine = Engine(load_model("qwen2.5-coder-0.5b"))
    corpus = Path(__file__).resolve().parent.parent / "samples" / "corpus"
    texts = [(corpus / n).read_text()[:400] for n in ("halvard-bridge.md", "mira-solberg.md", "ostmark.txt")]
    layout = engine.layout("Who designed the Halvard Bridge?", texts)
    full = run(engine, layout, "full")
    for selection in SELECTIONS:
        for later in ((), (8,)):
            blend = run(engine, layout, "blend", ratio=1.0, selection=selection, later_checks=later)
            assert (blend.logits - full.logits).abs().max().item() < 1e-4, (selection, later)
    assert (run(engine, layout, "reuse").logits - full.logits).abs().max().item() > 1e-2
