"""`ragblend eval` and `ragblend eval-ablation`: TTFT against quality over a dataset, every mode ×
ratio; and the selection × ratio ablation of `blend`. `register(app)` adds both commands."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from api.cli_common import (CheckLayersOpt, DeviationOpt, DeviceOpt, DtypeOpt, FrequencyPenaltyOpt, ModelOpt,
                            PresencePenaltyOpt, RepetitionPenaltyOpt, SelectionOpt, ThreadsOpt, check_layers_of, fail,
                            load_engine, penalties_given, selection_of, set_threads, unit_floats)
from blend.spec import SELECTIONS
from api.datadir import DEFAULT_NEIGHBOURS
from store.neighbours import DEFAULT_NEIGHBOUR_RULE, MAX_NEIGHBOURS, NEIGHBOUR_RULES

DatasetOpt = Annotated[Optional[str], typer.Option(
    help="a JSONL file (ragblend or LongBench format), 2wikimqa|musique|samsum|multi_news (a file in "
         "--data-dir), synthetic[:n=60,chunks=6,chunk_words=90,seed=0], or "
         "pyref[:n=40,chunks=6,chunk_words=150,seed=0] (passages of Python's language reference)")]
OutOpt = Annotated[Optional[Path], typer.Option(help="output directory (results, progress.jsonl for resuming)")]
DataDirOpt = Annotated[Optional[Path], typer.Option(
    help="holds LongBench files by name, and the index for examples without chunks")]
ModesOpt = Annotated[str, typer.Option(
    help="comma-separated: full, prefix, reuse, blend (full always runs: it is the reference)")]
RatiosOpt = Annotated[str, typer.Option(help="blend recompute ratios, comma-separated, each in [0, 1]")]
LimitOpt = Annotated[Optional[int], typer.Option(help="only the first N examples")]
MaxTokensOpt = Annotated[int, typer.Option(help="answer length cap (greedy decoding)")]
SeedOpt = Annotated[int, typer.Option(help="torch seed of the run (the synthetic data's seed is synthetic:seed=S)")]
TopKOpt = Annotated[int, typer.Option(help="chunks retrieved for examples without chunks")]
ChunkWordsOpt = Annotated[int, typer.Option(help="samsum/multi_news: most words per chunk cut from the context")]
FreshOpt = Annotated[bool, typer.Option("--fresh", help="discard the progress of an earlier run in --out")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="show a progress bar")]


def _names(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        fail(f"{flag} is empty")
    if bad := [n for n in names if n not in allowed]:
        fail(f"{flag}: unknown {bad[0]!r}; choose from {', '.join(allowed)}")
    return names


def _positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            fail(f"--{name.replace('_', '-')} must be ≥ 1, got {value}")


def _dataset(spec: str | None, data_dir: Path | None, chunk_words: int, limit: int | None):
    from eval.datasets import load_dataset

    if not spec:
        fail("--dataset is needed")
    try:
        dataset = load_dataset(spec, data_dir, chunk_words=chunk_words)
    except (ValueError, OSError) as e:
        fail(str(e))
    examples = dataset.examples[:limit] if limit else dataset.examples
    needs = next((ex.id for ex in examples if ex.chunks is None), None)
    return dataset, (_retriever(data_dir, needs) if needs else None)


def _retriever(data_dir: Path | None, example_id: str):
    """Examples without chunks retrieve from the index under --data-dir."""
    if data_dir is None:
        fail(f"example {example_id} has no chunks, so it retrieves: that needs --data-dir with an index")
    if not (data_dir / "corpus").is_dir():
        fail(f"no index in --data-dir {data_dir} (examples without chunks retrieve from it): "
             f"run `ragblend index PATH --data-dir {data_dir}` first")
    from retrieval import Corpus, Embedder

    corpus = Corpus(data_dir / "corpus", Embedder())
    if len(corpus) == 0:
        fail(f"the index in {data_dir} is empty")
    return lambda question, k: [hit.text for hit in corpus.search(question, k)]


def _index_corpus(data_dir: Path):
    """The index's chunks and their stored embeddings: where a retrieving example's neighbours are."""
    from eval.runner import NeighbourCorpus
    from retrieval.corpus import REGISTRY_FILE
    from retrieval.registry import Registry

    reg = Registry(data_dir / "corpus" / REGISTRY_FILE)
    try:
        ids, emb = reg.all_embeddings()
        texts = [r["text"] for r in reg.get_chunks([int(i) for i in ids])]
    finally:
        reg.close()
    return NeighbourCorpus(texts, emb)


def _out(out: Path | None) -> Path:
    if out is None:
        fail("--out DIR is needed")
    if out.exists() and not out.is_dir():
        fail(f"--out {out} exists and is not a directory")
    return out


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
    app.command("eval-ablation")(ablation_command)


def eval_command(
    dataset: DatasetOpt = None,
    out: OutOpt = None,
    modes: ModesOpt = "full,prefix,reuse,blend",
    ratios: RatiosOpt = "0.05,0.15,0.3,0.5,1.0",
    data_dir: DataDirOpt = None,
    model: ModelOpt = "default",
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    limit: LimitOpt = None,
    max_tokens: MaxTokensOpt = 32,
    seed: SeedOpt = 0,
    check_layer: Annotated[int, typer.Option(help="blend: the layer where tokens are selected")] = 1,
    check_layers: CheckLayersOpt = None,
    selection: SelectionOpt = None,
    deviation: DeviationOpt = None,
    top_k: TopKOpt = 5,
    chunk_words: ChunkWordsOpt = 200,
    fresh: FreshOpt = False,
    progress: ProgressOpt = True,
    threads: ThreadsOpt = None,
    kv_dtype: Annotated[Optional[str], typer.Option(help="serve the chunks' KV as a store in this format would "
                                                         "(int8, fp8, bfloat16, float16, float32); default: unquantized")] = None,
    frequency_penalty: FrequencyPenaltyOpt = None,
    presence_penalty: PresencePenaltyOpt = None,
    repetition_penalty: RepetitionPenaltyOpt = None,
    neighbours: Annotated[Optional[int], typer.Option(min=0, max=MAX_NEIGHBOURS, help=(
        "reuse and blend over neighbour-aware chunk KV, each chunk's computed behind its N nearest chunks (the "
        "dataset's, or the index's for examples that retrieve), as a data dir indexed with the default serves it; "
        f"0: plain per-chunk KV. Default: {DEFAULT_NEIGHBOURS} (api.datadir.DEFAULT_NEIGHBOURS) for a model with a "
        "tokenizer, 0 for a random-weight one without"))] = None,
    neighbour_rule: Annotated[str, typer.Option(help=f"with --neighbours: {', '.join(NEIGHBOUR_RULES)}")] = DEFAULT_NEIGHBOUR_RULE,
) -> None:
    """TTFT against quality: every mode × ratio on a dataset → results.json, results.md, plot.png.
    Decoding is greedy, without penalties unless given. reuse and blend read chunk KV as `serve`
    does by default (neighbour-aware entries, --neighbours 2); --neighbours 0 for plain entries."""
    set_threads(threads)
    from blend.spec import BadQuery, Sampling

    penalties = penalties_given(frequency_penalty, presence_penalty, repetition_penalty)
    try:
        Sampling(**penalties)
    except BadQuery as e:
        fail(f"--{e.field.replace('_', '-')}: {str(e).split(': ', 1)[1]}")
    from blend.spec import MODES
    from eval import report, runner

    mode_list = _names(modes, MODES, "--modes")
    ratio_list = unit_floats(ratios, "--ratios")
    selection = selection_of(selection, deviation)
    _positive(limit=limit, max_tokens=max_tokens, top_k=top_k, chunk_words=chunk_words)
    if check_layer < 0:
        fail(f"--check-layer must be ≥ 0, got {check_layer}")
    checks = check_layers_of(check_layer, check_layers)
    out = _out(out)
    data, retriever = _dataset(dataset, data_dir, chunk_words, limit)
    engine = load_engine(model, device, dtype)
    try:
        if neighbours and engine.prompts is None:
            raise ValueError(f"--neighbours {neighbours}: {model} has no tokenizer to find a chunk's neighbours by "
                             "text; use --neighbours 0")
        if neighbours is None:  # as `serve` reads a data dir indexed with the default
            neighbours = DEFAULT_NEIGHBOURS if engine.prompts is not None else 0
        if neighbour_rule not in NEIGHBOUR_RULES:
            raise ValueError(f"--neighbour-rule must be one of {', '.join(NEIGHBOUR_RULES)}, got {neighbour_rule!r}")
        rule = neighbour_rule if neighbours else None
        uses = rule is not None and any(m in ("reuse", "blend") for m in mode_list)
        variants = runner.mode_variants(mode_list, ratio_list, checks[0], selection, checks[1:], rule if uses else None)
        config = runner.run_config(engine, data, variants, max_tokens=max_tokens, seed=seed, top_k=top_k,
                                   penalties=penalties, neighbours=neighbours if uses else 0)
        if kv_dtype is not None:
            from store.quant import kv_format
            config["kv_format"] = kv_format(kv_dtype).name
        corpus = _index_corpus(data_dir) if uses and retriever is not None else None
        records = runner.run(engine, data, config, out, limit=limit, retriever=retriever, fresh=fresh,
                             progress=progress, corpus=corpus)
    except ValueError as e:
        fail(str(e))
    summary = report.summarize(records)
    report.write_results(out, config, records, summary)
    typer.echo(report.markdown(config, summary))
    typer.echo(f"wrote {out}/results.json, results.md, plot.png", err=True)


def ablation_command(
    dataset: DatasetOpt = None,
    out: OutOpt = None,
    ratios: RatiosOpt = "0.05,0.15,0.3",
    selections: Annotated[str, typer.Option(help=f"comma-separated: {', '.join(SELECTIONS)}")] = ",".join(SELECTIONS),
    check_layers: Annotated[str, typer.Option(help="comma-separated check layers, each a single check")] = "1",
    gradual: Annotated[Optional[str], typer.Option(
        help="also these gradual-filtering schedules, ';'-separated lists of check layers (e.g. '1,8;1,4,12')")] = None,
    deviations: Annotated[Optional[str], typer.Option(hidden=True, help="retired: use --selections")] = None,
    neighbours: Annotated[int, typer.Option(min=0, max=MAX_NEIGHBOURS, help=(
        "also every variant over neighbour-aware chunk KV: each chunk's KV computed behind its N nearest chunks of "
        "the corpus (the dataset's chunks, or the index's for examples that retrieve); 0: off"))] = 0,
    neighbour_rules: Annotated[str, typer.Option(help=f"with --neighbours: when a chunk is served its neighbour-aware "
                                                      f"entry, comma-separated: {', '.join(NEIGHBOUR_RULES)}")] = ",".join(NEIGHBOUR_RULES),
    data_dir: DataDirOpt = None,
    model: ModelOpt = "default",
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    limit: LimitOpt = None,
    max_tokens: MaxTokensOpt = 32,
    seed: SeedOpt = 0,
    chunk_words: ChunkWordsOpt = 200,
    fresh: FreshOpt = False,
    progress: ProgressOpt = True,
    threads: ThreadsOpt = None,
) -> None:
    """blend for every selection × ratio (× check layer), against full → ablation.json, .md, .png."""
    set_threads(threads)
    from eval.ablation import run_ablation

    if deviations is not None:
        fail("--deviations is retired: use --selections (value and key are two of them)")
    ratio_list = unit_floats(ratios, "--ratios")
    try:
        layers = [int(s) for s in check_layers.split(",") if s.strip()]
    except ValueError:
        fail(f"--check-layers must be comma-separated integers, got {check_layers!r}")
    if not layers or min(layers) < 0:
        fail("--check-layers needs at least one layer, each ≥ 0")
    schedules = [check_layers_of(0, g) for g in (gradual or "").split(";") if g.strip()]
    if any(len(g) < 2 for g in schedules):
        fail(f"--gradual: each schedule needs at least two check layers, got {gradual!r}")
    sels = _names(selections, SELECTIONS, "--selections")
    rules = _names(neighbour_rules, NEIGHBOUR_RULES, "--neighbour-rules") if neighbours else []
    _positive(limit=limit, max_tokens=max_tokens, chunk_words=chunk_words)
    out = _out(out)
    data, retriever = _dataset(dataset, data_dir, chunk_words, limit)
    corpus = _index_corpus(data_dir) if neighbours and retriever is not None else None
    engine = load_engine(model, device, dtype)
    try:
        run_ablation(engine, data, out, ratios=ratio_list, selections=sels, check_layers=layers, gradual=schedules,
                     max_tokens=max_tokens, seed=seed, limit=limit, retriever=retriever, fresh=fresh,
                     progress=progress, neighbours=neighbours, neighbour_rules=rules, corpus=corpus)
    except ValueError as e:
        fail(str(e))
    typer.echo((out / "ablation.md").read_text(encoding="utf-8"))
    typer.echo(f"wrote {out}/ablation.json, ablation.md, ablation.png", err=True)

