"""Token selection as a policy: every selector spends exactly its budget, is exact at r = 1, and
the attention selector scores what the model's own attention says; the quality guard."""
from __future__ import annotations

import math

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
        got = lookahead_attention(parts, hq, cos[S:], sin[S:], layers, lambda i: cache[i, 0, :, :S], P, S)
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
def test_guard_with_bound_zero_falls_back_to_full(tiny_engines, arch):
    engine = tiny_engines[arch]
    layout = make_layout()
    full = run(engine, layout, "full")
    guarded = run(engine, layout, "blend", ratio=0.15, guard=0.0)
    assert guarded.selected.ratio == 1.0
    assert guarded.recomputed_tokens == layout.n_chunk_tokens
    assert (guarded.logits - full.logits).abs().max().item() < 1e-4


def test_guard_keeps_the_ratio_when_the_estimate_is_under_its_bound(tiny_engines):
    engine = tiny_engines["tiny-llama"]
    layout = make_layout()
    loose = run(engine, layout, "blend", ratio=0.15, guard=1e9)
    plain = run(engine, layout, "blend", ratio=0.15)
    assert loose.selected.ratio == 0.15 and float(loose.selected.estimate) <= 1e9
    assert torch.equal(loose.logits, plain.logits)
    # the estimate shrinks as more is recomputed, and is 0 when everything is
    est = [float(run(engine, layout, "blend", ratio=r, guard=1e9).selected.estimate) for r in (0.05, 0.3, 1.0)]
    assert est[0] >= est[1] >= est[2] == 0.0


def test_blend_config_refuses_a_negative_or_infinite_guard():
    for bad in (-0.1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="guard"):
            BlendConfig(guard=bad)
