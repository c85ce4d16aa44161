"""Repetition control (blend/penalties.py): the batched function against its definition, computed
directly token by token, and on the engine's decode path (blend at r = 1 still equals full;
repetition_penalty equals transformers' own processor)."""
from __future__ import annotations

import pytest
import torch

from blend.penalties import penalize, token_counts
from blend.shapes import TINY_ARCHS
from blend.spec import BadQuery, BlendConfig, QuerySpec, Sampling
from blend.prompt import Layout

VOCAB = 50


def direct(logits: list[float], answer: list[int], prompt: list[int], f: float, p: float, r: float) -> list[float]:
    """The definition, one token at a time (vLLM: repetition first, then frequency and presence)."""
    out = []
    for tok, x in enumerate(logits):
        n = answer.count(tok)
        if n or tok in prompt:
            x = x / r if x > 0 else x * r
        out.append(x - f * n - p * (1.0 if n else 0.0))
    return out


def test_penalties_change_logits_as_their_definition_says():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, VOCAB, generator=g) * 3
    answers = [[1, 1, 1, 4, 7], [], [2, 9, 9]]
    prompts = [[4, 5, 6], [1, 2], []]
    values = [(0.5, 0.3, 1.3), (-0.4, 1.2, 0.8), (2.0, -2.0, 1.0)]
    seen = torch.zeros(3, VOCAB, dtype=torch.bool)
    for i, pr in enumerate(prompts):
        seen[i, pr] = True
    f, p, r = (torch.tensor(v) for v in zip(*values))
    got = penalize(logits, token_counts(answers, VOCAB, "cpu"), f, p, r, seen)
    for i in range(3):
        want = direct(logits[i].tolist(), answers[i], prompts[i], *values[i])
        assert got[i].tolist() == pytest.approx(want, abs=1e-5)


def test_neutral_penalties_leave_a_row_bit_identical():
    logits = torch.randn(2, VOCAB)
    counts = token_counts([[3, 3, 8], [0]], VOCAB, "cpu")
    got = penalize(logits, counts, torch.zeros(2), torch.zeros(2), torch.ones(2), torch.ones(2, VOCAB, dtype=torch.bool))
    assert torch.equal(got, logits)


def test_token_counts_count_each_rows_tokens():
    counts = token_counts([[1, 1, 2], [], [4]], 6, "cpu")
    assert counts.tolist() == [[0, 2, 1, 0, 0, 0], [0] * 6, [0, 0, 0, 0, 1, 0]]


@pytest.mark.parametrize("field,value", [("frequency_penalty", 2.5), ("presence_penalty", -2.1),
                                         ("repetition_penalty", 0.0), ("repetition_penalty", float("nan"))])
def test_out_of_range_penalties_are_refused_naming_the_field(field, value):
    with pytest.raises(BadQuery, match=field):
        Sampling(**{field: value})


def _layout(vocab: int = 512) -> Layout:
    g = torch.Generator().manual_seed(3)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    return Layout(prefix=ids(6), chunks=[ids(9), ids(12), ids(7)], suffix=ids(8))


def _tokens(engine, layout, mode, sampling, ratio=1.0, n=24) -> list[int]:
    spec = QuerySpec(mode, BlendConfig(ratio=ratio), sampling, n)
    return engine.generate(layout, spec).run().token_ids


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_blend_at_ratio_one_equals_full_with_penalties_on(tiny_engines, arch):
    engine, layout = tiny_engines[arch], _layout()
    sampling = Sampling(frequency_penalty=0.7, presence_penalty=0.4, repetition_penalty=1.3)
    full = _tokens(engine, layout, "full", sampling)
    assert _tokens(engine, layout, "blend", sampling) == full
    assert full != _tokens(engine, layout, "full", Sampling())  # the penalties did something


def test_repetition_penalty_decodes_as_transformers_processor(tiny_engines):
    """transformers' RepetitionPenaltyLogitsProcessor reads the prompt and the answer, like vLLM."""
    engine, layout = tiny_engines[TINY_ARCHS[0]], _layout()
    ours = _tokens(engine, layout, "full", Sampling(repetition_penalty=1.5), n=20)
    ids = torch.tensor([layout.ids()])
    ref = engine.model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False, repetition_penalty=1.5,
                                eos_token_id=None, pad_token_id=0)
    assert ours == ref[0, ids.shape[1]:].tolist()


def test_rows_with_different_penalties_decoded_together_answer_as_each_alone(tiny_engines):
    from blend.spec import Mode
    from tests.test_blend import make_layout
    from tests.conftest import serving
    from tests.test_scheduler import Recorder

    engine = tiny_engines["tiny-llama"]
    samplings = [Sampling(), Sampling(frequency_penalty=1.5), Sampling(presence_penalty=-1.0, repetition_penalty=1.4),
                 Sampling(repetition_penalty=0.7)]
    cases = {i: (make_layout(3 + i, 20 + i), QuerySpec(Mode.BLEND, BlendConfig(ratio=0.3), s, 16))
             for i, s in enumerate(samplings)}
    solo = {i: engine.generate(lay, spec).run().token_ids for i, (lay, spec) in cases.items()}
    rec = Recorder()
    jobs = [rec.job(engine, i, lay, spec) for i, (lay, spec) in cases.items()]
    with serving(engine, rec.on_step, prefill_tokens=4096) as sched:
        for job in jobs:  # all queued before the loop starts: decoded in one batch
            sched.submit(job)
        sched.start()
        rec.wait(len(cases))
    assert not rec.errors and max(rec.batches) == len(cases)
    assert {i: a.token_ids for i, a in rec.answers.items()} == solo
