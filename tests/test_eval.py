"""The eval package: metrics against hand-computed values, the dataset loaders on fixture files,
the synthetic generator, and whole runs on a tiny random-weight model (resumable, deterministic)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import typer
from typer.testing import CliRunner

from eval import metrics
from eval.datasets import LONGBENCH_PROMPTS, load_dataset, pack_paragraphs
from eval.synthetic import generate

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
TIMING = ("ttft_ms", "ttft_ms_median", "ttft_ms_p90", "speedup_vs_full")


# -- metrics --------------------------------------------------------------------------------------
def test_normalize_answer_drops_case_punctuation_and_articles():
    assert metrics.normalize_answer("  The Cat, an  owl & A dog! ") == "cat owl dog"


def test_token_f1_matches_hand_computed_value():
    # "the cat sat on the mat" → cat sat on mat (4 tokens); "Cat on mat." → cat on mat (3 tokens).
    # Overlap 3: precision 3/4, recall 3/3, F1 = 2·(3/4)·1 / (3/4 + 1) = 6/7.
    assert metrics.token_f1("the cat sat on the mat", "Cat on mat.") == pytest.approx(6 / 7)
    assert metrics.token_f1("dog", "cat") == 0.0


def test_rouge_l_matches_hand_computed_value():
    # cat was found under bed (5) vs cat was under bed (4): LCS = cat was under bed = 4;
    # P = 4/5, R = 4/4, F = 2·0.8·1 / 1.8 = 8/9.
    assert metrics.rouge_l("The cat was found under the bed", "the cat was under the bed") == pytest.approx(8 / 9)
    # Order matters to ROUGE-L, not to F1: bed under was cat vs cat was under bed → LCS 1, F = 1/4.
    assert metrics.rouge_l("bed under was cat", "cat was under bed") == pytest.approx(1 / 4)
    assert metrics.token_f1("bed under was cat", "cat was under bed") == pytest.approx(1.0)


def test_scores_take_the_best_of_the_accepted_answers():
    assert metrics.best_over(metrics.token_f1, "188 km", ["188 kilometres", "188 km"]) == 1.0
    assert metrics.best_over(metrics.token_f1, "188 km", ["188 kilometres"]) == pytest.approx(0.5)


def test_first_token_kl_matches_closed_form():
    # p = softmax([0, 0]) = (1/2, 1/2), q = softmax([ln 3, 0]) = (3/4, 1/4):
    # KL(p‖q) = ½·ln((1/2)/(3/4)) + ½·ln((1/2)/(1/4)) = ½·ln(4/3).
    kl = metrics.kl_first_token(torch.tensor([0.0, 0.0]), torch.tensor([math.log(3.0), 0.0]))
    assert kl == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    assert metrics.kl_first_token(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0])) == 0.0


def test_agreement_and_recompute_fraction():
    assert metrics.agreement([1, 2, 3], [1, 2, 3]) == 1.0
    assert metrics.agreement([1, 2, 3], [1, 2]) == 0.0
    assert metrics.leading_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert metrics.leading_agreement([1, 2, 3], [1, 2, 3, 4]) == 3
    assert metrics.leading_agreement([5, 2], [1, 2]) == 0
    assert metrics.recompute_fraction(15, 100) == 0.15


# -- datasets -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["2wikimqa", "musique"])
def test_multidoc_qa_loader_splits_passages_and_uses_longbench_prompt(name):
    data = load_dataset(str(FIXTURES / f"{name}.jsonl"))
    assert (data.name, data.metric, len(data.examples)) == (name, "f1", 3)
    ex = data.examples[0]
    assert ex.id == f"{name}-fixture-0"
    assert len(ex.chunks) == (3 if name == "2wikimqa" else 2)
    assert all("Passage" not in c for c in ex.chunks)  # the rank number is not part of a chunk
    assert ex.chunks[0].startswith(ex.chunks[0].splitlines()[0] + "\n")  # the title leads the passage
    assert ex.prompt == LONGBENCH_PROMPTS[name].format(input=ex.question)
    assert ex.prompt.endswith(f"Question: {ex.question}\nAnswer:")


def test_2wikimqa_fixture_passages_are_the_marked_ones():
    ex = load_dataset(str(FIXTURES / "2wikimqa.jsonl")).examples[2]
    assert [c.splitlines()[0] for c in ex.chunks] == ["Aller (river)", "Weser", "Tributary", "Lower Saxony"]
    assert ex.answers == ["Germany", "Federal Republic of Germany"]


def test_samsum_loader_cuts_few_shot_examples_and_scores_rouge():
    data = load_dataset(str(FIXTURES / "samsum.jsonl"), chunk_words=22)
    assert (data.name, data.metric) == ("samsum", "rougeL")
    ex = data.examples[2]
    assert len(ex.chunks) == 3 and all(c.startswith("Dialogue:") for c in ex.chunks)
    assert ex.prompt.startswith("Summarize the dialogue") and ex.prompt.endswith("Summary:")
    assert "Kai: Can you send me the report?" in ex.prompt
    # with room for all of them, the examples are packed into one chunk
    assert len(load_dataset(str(FIXTURES / "samsum.jsonl"), chunk_words=200).examples[2].chunks) == 1


def test_multi_news_loader_keeps_passages_apart_and_caps_chunk_words():
    data = load_dataset(str(FIXTURES / "multi_news.jsonl"), chunk_words=8)
    assert (data.name, data.metric) == ("multi_news", "rougeL")
    ex = data.examples[0]
    assert ex.chunks[0].startswith("The town council of Ostmark")
    assert all(len(c.split()) <= 13 for c in ex.chunks)  # one 13-word paragraph cannot be packed
    assert ex.prompt.endswith("Summary:")
    # paragraphs of one passage are packed together; two passages never share a chunk
    assert pack_paragraphs("Passage 1:\na b\n\nc d\nPassage 2:\ne f", 10) == ["a b\n\nc d", "e f"]
    assert pack_paragraphs("one two three\n\nfour five", 3) == ["one two three", "four five"]


def test_longbench_names_resolve_in_the_data_dir(tmp_path):
    (tmp_path / "longbench").mkdir()
    (tmp_path / "longbench" / "musique.jsonl").write_bytes((FIXTURES / "musique.jsonl").read_bytes())
    assert load_dataset("musique", tmp_path).examples[1].answers == ["Mira Solberg"]
    with pytest.raises(ValueError, match="LongBench file kept locally"):
        load_dataset("musique")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("nosuchset")


def test_ragblend_jsonl_loader_reads_chunks_and_answers():
    data = load_dataset(str(FIXTURES / "qa.jsonl"))
    assert (data.name, data.metric, [e.id for e in data.examples]) == ("qa", "f1", ["q1", "q2", "q3"])
    assert data.examples[2].answers == ["188 kilometres", "188 km"]
    assert data.examples[0].prompt is None and len(data.examples[1].chunks) == 2


# -- synthetic ------------------------------------------------------------------------------------
def test_synthetic_generator_is_deterministic_per_seed():
    assert generate(n=10, seed=3) == generate(n=10, seed=3)
    assert generate(n=10, seed=3) != generate(n=10, seed=4)
    assert load_dataset("synthetic:n=10,seed=3").digest() == load_dataset("synthetic:seed=3,n=10").digest()


def test_every_synthetic_answer_occurs_in_one_of_its_chunks():
    for ex in generate(n=40, chunks=5, chunk_words=60, seed=1):
        assert len(ex.chunks) == 5
        assert any(ex.answers[0] in c for c in ex.chunks), ex
        assert all(len(c.split()) >= 60 for c in ex.chunks)
    two_hop = [ex for ex in generate(n=14) if "the founder of" in ex.question]
    assert two_hop and all("founder" in ex.id for ex in two_hop)


def test_synthetic_options_are_checked():
    with pytest.raises(ValueError, match="unknown synthetic option"):
        load_dataset("synthetic:rows=3")
    with pytest.raises(ValueError, match="chunks ≥ 2"):
        load_dataset("synthetic:chunks=1")


@pytest.mark.real
def test_six_synthetic_chunks_make_a_600_token_prompt_with_smollm2():
    from transformers import AutoTokenizer

    from blend.loader import bundled_model_dir
    from blend.prompt import PromptBuilder
    from eval.layouts import layout_for

    prompts = PromptBuilder(AutoTokenizer.from_pretrained(bundled_model_dir()))
    engine = SimpleNamespace(prompts=prompts, layout=prompts.layout)  # the Engine's layout, without weights
    for ex in generate(n=7, chunks=6):
        assert layout_for(engine, ex, ex.chunks).n_tokens >= 600
    lb = load_dataset(str(FIXTURES / "2wikimqa.jsonl")).examples[0]
    layout = layout_for(engine, lb, lb.chunks)
    assert engine.prompts.tokenizer.decode(layout.suffix) == lb.prompt + engine.prompts.tail_text


# -- whole runs on a tiny model -------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    from blend.engine import Engine
    from blend.loader import load_model

    engine = Engine(load_model("random:tiny"))
    calls = []
    generate_ = engine.generate
    engine.generate = lambda layout, spec, kv=None: calls.append((spec.mode.value, spec.max_tokens)) or generate_(layout, spec, kv)
    return SimpleNamespace(engine=engine, calls=calls,
                           data=load_dataset("synthetic:n=3,chunks=3,chunk_words=30,seed=5"))


def _run(tiny, out, limit=None, fresh=False, ratios=(0.5, 1.0)):
    from eval import report, runner

    variants = runner.mode_variants(["full", "reuse", "blend"], ratios)
    config = runner.run_config(tiny.engine, tiny.data, variants, max_tokens=4, seed=0, top_k=5)
    records = runner.run(tiny.engine, tiny.data, config, out, limit=limit, fresh=fresh, progress=False)
    report.write_results(out, config, records, report.summarize(records))
    return json.loads((Path(out) / "results.json").read_text())


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


@pytest.fixture(scope="module")
def tiny_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_run")
    return out, _run(tiny, out)


def test_tiny_run_writes_results_table_and_plot(tiny_run):
    out, results = tiny_run
    assert {"results.json", "results.md", "plot.png", "progress.jsonl"} <= {p.name for p in out.iterdir()}
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [(r["mode"], r["ratio"]) for r in results["summary"]]
    assert rows == [("full", None), ("reuse", None), ("blend", 0.5), ("blend", 1.0)]
    assert all(r["n"] == 3 for r in results["summary"])
    assert len(results["examples"]) == 3 and len(results["examples"][0]["results"]) == 4
    table = (out / "results.md").read_text()
    assert "| blend | 0.5 | 3 |" in table and "| full | — | 3 |" in table


def test_tiny_run_blend_at_ratio_one_matches_full(tiny_run):
    summary = {(r["mode"], r["ratio"]): r for r in tiny_run[1]["summary"]}
    one, full, reuse = summary["blend", 1.0], summary["full", None], summary["reuse", None]
    assert one["kl_vs_full"] < 1e-4 and one["agree_with_full"] == 1.0 and one["rougeL_vs_full"] == 1.0
    assert one["first4_with_full"] == 1.0 and one["lead_with_full"] == full["lead_with_full"] > 0
    assert one["recompute_fraction"] == 1.0 and reuse["recompute_fraction"] == 0.0
    assert full["kl_vs_full"] == 0.0 and full["speedup_vs_full"] == 1.0
    assert reuse["kl_vs_full"] > one["kl_vs_full"]  # otherwise the KL column measures nothing
    assert summary["blend", 0.5]["recompute_fraction"] == pytest.approx(0.5, abs=0.02)


def test_resume_reproduces_numbers_without_recomputing(tiny, tiny_run):
    out, first = tiny_run
    (out / "results.json").unlink()
    tiny.calls.clear()
    again = _run(tiny, out)
    assert tiny.calls == []  # every example was finished: nothing ran again
    assert _without_timings(again) == _without_timings(first)
    assert again["summary"][0]["ttft_ms_median"] == first["summary"][0]["ttft_ms_median"]


def test_a_fresh_run_gives_the_same_non_timing_numbers(tiny, tiny_run, tmp_path):
    assert _without_timings(_run(tiny, tmp_path)) == _without_timings(tiny_run[1])


def test_interrupted_run_resumes_with_the_unfinished_examples(tiny, tiny_run, tmp_path):
    _run(tiny, tmp_path, limit=1)
    progress = tmp_path / "progress.jsonl"
    lines = progress.read_text().splitlines(keepends=True)
    assert len(lines) == 2  # the config, one example
    progress.write_text(lines[0] + lines[1] + lines[1][:40])  # died while writing the next one
    tiny.calls.clear()
    resumed = _run(tiny, tmp_path)  # a larger limit resumes the same config
    scored = [c for c in tiny.calls if c[1] == 4]  # the rest are the untimed warm-up passes
    assert len(scored) == 2 * 4  # the torn example and the new one, four variants each
    assert _without_timings(resumed["examples"]) == _without_timings(tiny_run[1]["examples"])


def test_a_different_config_refuses_to_resume_unless_fresh(tiny, tiny_run, tmp_path):
    _run(tiny, tmp_path, limit=1)
    with pytest.raises(ValueError, match="another config.*--fresh"):
        _run(tiny, tmp_path, limit=1, ratios=(0.25,))
    assert [r["ratio"] for r in _run(tiny, tmp_path, limit=1, ratios=(0.25,), fresh=True)["summary"]] == [None, None, 0.25]


def test_ablation_covers_selections_ratios_and_check_layers(tiny, tmp_path):
    from blend.spec import SELECTIONS
    from eval.ablation import run_ablation

    rows = run_ablation(tiny.engine, tiny.data, tmp_path, ratios=(0.05, 0.3), check_layers=(1, 4), max_tokens=2,
                        gradual=[(1, 2), (1, 4)], limit=1, progress=False)
    assert [r["mode"] for r in rows[:2]] == ["full", "reuse"]
    # random:tiny has 4 layers, so check layer 4 does not exist and is left out (alone or in a schedule)
    assert [(r["check_layer"], r["later_checks"], r["selection"], r["ratio"]) for r in rows[2:]] == [
        (1, later, s, r) for later in (None, [2]) for s in SELECTIONS for r in (0.05, 0.3)]
    assert all(r["recompute_fraction"] > 0 for r in rows[2:])
    table = (tmp_path / "ablation.md").read_text()
    from blend.spec import DEFAULT_SELECTION
    assert f"| {DEFAULT_SELECTION} (default) | 1 | — | 0.3 |" in table and "r = 0.05: lowest KL with" in table
    assert f"| {DEFAULT_SELECTION} (default) | 1,2 | — | 0.3 |" in table
    assert (tmp_path / "ablation.png").stat().st_size > 10_000


def test_pyref_is_real_reference_prose_with_the_target_never_first():
    a = load_dataset("pyref:n=6,chunks=5,chunk_words=80,seed=1")
    assert a.digest() == load_dataset("pyref:n=6,chunks=5,chunk_words=80,seed=1").digest()  # seeded
    assert a.metric == "rougeL" and len(a.examples) == 6
    for ex in a.examples:
        assert len(ex.chunks) == 5 and all(len(c.split()) <= 80 + 12 for c in ex.chunks)
        flat = [" ".join(c.split()) for c in ex.chunks]
        holder = [i for i, c in enumerate(flat) if ex.answers[0] in c]
        assert holder and holder[0] >= 1  # the answer's passage is never the (exactly cached) first chunk
    with pytest.raises(ValueError, match="unknown pyref option"):
        load_dataset("pyref:words=3")


# -- the command line -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli():
    from api.cli_eval import register

    app = typer.Typer()
    register(app)
    return lambda *args: CliRunner().invoke(app, ["eval", *args])


@pytest.mark.parametrize("args, message", [
    (["--dataset", "nosuchset"], "unknown dataset 'nosuchset'"),
    (["--dataset", "missing/file.jsonl"], "unknown dataset"),
    (["--dataset", "synthetic", "--modes", "full,turbo"], "--modes: unknown 'turbo'"),
    (["--dataset", "synthetic", "--ratios", "0.5,1.5"], "must lie in [0, 1], got 1.5"),
    (["--dataset", "synthetic", "--ratios", "half"], "comma-separated numbers"),
    (["--dataset", "synthetic", "--deviation", "query"], "--deviation 'query' is retired"),
    (["--dataset", "synthetic", "--selection", "query"], "--selection must be one of"),
    (["--dataset", "synthetic", "--selection", "key", "--deviation", "key"], "not both"),
    (["--dataset", "synthetic", "--check-layers", "4,1"], "--check-layers must be increasing"),
    ([], "--dataset is needed"),
])
def test_cli_rejects_bad_input_with_exit_code_2(cli, tmp_path, args, message):
    result = cli(*args, "--out", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and message in result.output


def test_the_removed_guard_is_no_option_any_more(cli, tmp_path):
    result = cli("--dataset", "synthetic", "--guard", "0.5", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "No such option" in result.output


def test_cli_examples_without_chunks_need_an_index(cli, tmp_path):
    data = tmp_path / "noctx.jsonl"
    data.write_text(json.dumps({"id": "a", "question": "Why?", "answers": ["because"]}) + "\n")
    result = cli("--dataset", str(data), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "needs --data-dir with an index" in result.output


def test_cli_eval_runs_on_a_tiny_model(cli, tmp_path):
    out = tmp_path / "out"
    result = cli("--dataset", str(FIXTURES / "qa.jsonl"), "--model", "random:tiny", "--modes", "full,prefix,blend",
                 "--ratios", "1.0", "--max-tokens", "2", "--no-progress", "--out", str(out))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert [(r["mode"], r["ratio"]) for r in summary] == [("full", None), ("prefix", None), ("blend", 1.0)]
    assert "| prefix | — | 3 |" in result.output


@pytest.mark.real  # tiny-smol speaks the bundled tokenizer: chunks have neighbours by text
def test_cli_eval_reads_chunk_kv_as_a_default_data_dir_serves_it(cli, tmp_path):
    """reuse and blend over neighbour-aware chunk KV by default (what `serve` reads from a data dir
    indexed with the default), plain with --neighbours 0; blend at r = 1 equals full either way. A
    model with no tokenizer cannot find neighbours: asked for, that is a clear error."""
    from api.datadir import DEFAULT_NEIGHBOURS

    args = ["--dataset", str(FIXTURES / "qa.jsonl"), "--model", "random:tiny-smol", "--modes", "full,reuse,blend",
            "--ratios", "1.0", "--max-tokens", "2", "--no-progress"]
    for extra, want in (([], DEFAULT_NEIGHBOURS), (["--neighbours", "0"], 0)):
        out = tmp_path / f"out{want}"
        result = cli(*args, *extra, "--out", str(out))
        assert result.exit_code == 0, result.output
        saved = json.loads((out / "results.json").read_text())
        assert saved["config"].get("neighbours", 0) == want
        assert [v["neighbours"] for v in saved["config"]["variants"]] == [None, *(["always"] * 2 if want else [None] * 2)]
        blend = next(r for r in saved["summary"] if r["mode"] == "blend")
        assert blend["kl_vs_full"] < 1e-6 and blend["agree_with_full"] == 1.0
        assert ("neighbour-aware chunk KV (N = 2" in result.output) == bool(want)
    bad = cli("--dataset", str(FIXTURES / "qa.jsonl"), "--model", "random:tiny", "--neighbours", "1",
              "--max-tokens", "2", "--no-progress", "--out", str(tmp_path / "bad"))
    assert bad.exit_code != 0 and "has no tokenizer" in bad.output


@pytest.mark.real  # tiny-smol speaks the bundled tokenizer, so prompts are measured before the run
def test_eval_progress_counts_prompt_tokens_with_rate_and_eta(tmp_path, capsys):
    from blend.engine import Engine
    from blend.loader import load_model
    from tqdm import tqdm

    from eval import runner

    engine = Engine(load_model("random:tiny-smol"))
    data = load_dataset("synthetic:n=2,chunks=2,chunk_words=30,seed=1")
    variants = runner.mode_variants(["full", "blend"], [0.5])
    config = runner.run_config(engine, data, variants, max_tokens=2, seed=0, top_k=5)
    runner.run(engine, data, config, tmp_path, progress=True, warmup=False)
    records = json.loads("[" + ",".join((tmp_path / "progress.jsonl").read_text().splitlines()[1:]) + "]")
    err = capsys.readouterr().err
    final = err.replace("\r", "\n").strip().splitlines()[-1]
    total = sum(engine.layout(ex.question, ex.chunks).n_tokens for ex in data.examples) * len(variants)
    shown = re.escape(tqdm.format_sizeof(total))  # unit_scale: 672, 1.23k
    assert len(records) == 2
    assert re.search(rf"eval: 100%.* {shown}/{shown} \[[\d:]+<[\d:]+, .*tok/s", final), final


def test_contains_answer_and_loops_score_what_a_reader_sees():
    from eval.metrics import contains_answer, loops

    assert contains_answer("It was designed by Mira Solberg in 1931.", ["mira solberg"]) == 1.0
    assert contains_answer("Solberg's bridge", ["Mira Solberg"]) == 0.0
    assert contains_answer("built 19311", ["1931"]) == 0.0  # whole words only
    once = "the bridge is 412 metres long and carries a railway and a road"
    assert loops(once) == 0.0 and loops(once + ". " + once) == 1.0


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_examples():
    from eval.report import bootstrap_ci

    few, many = [0, 1] * 5, [0, 1] * 200
    lo, hi = bootstrap_ci(few)
    lo2, hi2 = bootstrap_ci(many)
    assert lo < 0.5 < hi and lo2 < 0.5 < hi2 and hi2 - lo2 < hi - lo
    assert bootstrap_ci([1.0] * 7) == [1.0, 1.0]
