"""The eval loop: per example, `full` first (the reference), then every other mode × ratio over the
same chunks, the same layout and the same precomputed chunk KVs; each finished example is
appended to `progress.jsonl` so a restarted run picks up where it stopped."""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from blend.engine import Answer, Engine
from blend.spec import DEFAULT_SELECTION, MODES, BlendConfig, Mode, QuerySpec, Sampling
from store.neighbours import NeighbourKV, check_rule
from store.tiers import ChunkKVCache, ChunkKVSource
from blend.prompt import Layout

from eval import metrics
from eval.examples import Dataset, Example
from eval.layouts import fit_to_context
from eval.progress import Progress

PROGRESS_FILE = "progress.jsonl"


class Retriever(Protocol):
    """Chunks for a question from an index, best first."""

    def __call__(self, question: str, k: int) -> list[str]: ...


@dataclass(frozen=True)
class Variant:
    """One prefill setting to score: a mode, and for `blend` its ratio, check layer, selection and
    later check layers (gradual filtering)."""
    mode: str
    ratio: float | None = None
    check_layer: int | None = None
    selection: str | None = None
    later_checks: tuple[int, ...] = ()
    neighbours: str | None = None  # reuse/blend over neighbour-aware chunk KV, by this rule (store/neighbours.py)

    def __post_init__(self) -> None:
        object.__setattr__(self, "later_checks", tuple(self.later_checks))  # a list, from a results file
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.neighbours is not None:
            check_rule(self.neighbours)
            if self.mode not in ("reuse", "blend"):
                raise ValueError(f"{self.mode} reads no cached chunk KV, so it takes no neighbour rule")
        if self.mode == "blend":
            if None in (self.ratio, self.check_layer, self.selection):
                raise ValueError("blend needs a ratio, a check layer and a selection")
            self.blend_config()  # validates their values
        elif (self.ratio, self.check_layer, self.selection, self.later_checks) != (None, None, None, ()):
            raise ValueError(f"{self.mode} takes no ratio, check layer or selection")

    def blend_config(self) -> BlendConfig | None:
        if self.mode != "blend":
            return None
        return BlendConfig(ratio=self.ratio, check_layer=self.check_layer, selection=self.selection,
                           later_checks=self.later_checks)

    def spec(self, max_tokens: int, penalties: dict | None = None) -> QuerySpec:
        """The query the engine runs for this variant: greedy, like every eval answer, with the
        run's repetition penalties (config `penalties`) if any."""
        return QuerySpec(Mode(self.mode), self.blend_config() or BlendConfig(), Sampling(**(penalties or {})),
                         max_tokens)

    @property
    def key(self) -> tuple:
        return self.mode, self.ratio, self.check_layer, self.selection, self.later_checks, self.neighbours


FULL = Variant("full")


def mode_variants(modes: Sequence[str], ratios: Sequence[float], check_layer: int = 1,
                  selection: str = DEFAULT_SELECTION, later_checks: Sequence[int] = (),
                  neighbour_rule: str | None = None) -> list[Variant]:
    """`full` first, whether asked for or not (every other mode is scored against it); then the
    modes in the order given, `blend` once per ratio. `neighbour_rule`: reuse and blend read
    neighbour-aware chunk KV by it, as a data dir with --neighbours N serves them."""
    out = [FULL]
    for mode in modes:
        if mode == "blend":
            out += [Variant("blend", float(r), check_layer, selection, tuple(later_checks), neighbour_rule)
                    for r in ratios]
        elif mode == "reuse":
            out.append(Variant(mode, neighbours=neighbour_rule))
        elif mode != "full":
            out.append(Variant(mode))
    if len(set(out)) != len(out):
        raise ValueError("a mode or ratio is listed twice")
    return out


def run_config(engine: Engine, dataset: Dataset, variants: Sequence[Variant], *, max_tokens: int,
               seed: int, top_k: int, penalties: dict | None = None, neighbours: int = 0) -> dict:
    """Everything that changes the numbers; its hash guards resumption. `--limit` is left out, so a
    run can be resumed with a larger one."""
    if not variants or variants[0] != FULL:
        raise ValueError("the first variant must be full: it is the reference")
    n_layers = engine.parts.n_layers
    if any(v.check_layer is not None and max((v.check_layer, *v.later_checks)) >= n_layers for v in variants):
        raise ValueError(f"a check layer must be below the model's {n_layers} layers")
    if any(v.neighbours for v in variants) != (neighbours > 0):
        raise ValueError("variants with a neighbour rule need neighbours ≥ 1, and neighbours need such a variant")
    return {"dataset": dataset.name, "dataset_digest": dataset.digest(), "metric": dataset.metric,
            "model": engine.name, "fingerprint": engine.fingerprint, "device": str(engine.device),
            "dtype": str(engine.parts.dtype).removeprefix("torch."),
            "variants": [asdict(v) for v in variants], "max_tokens": max_tokens, "seed": seed,
            "top_k": top_k, "decoding": "greedy",
            **({"penalties": dict(penalties)} if penalties else {}),
            **({"neighbours": neighbours} if neighbours else {})}


def run(engine: Engine, dataset: Dataset, config: dict, out_dir: str | Path, *, limit: int | None = None,
        retriever: Retriever | None = None, fresh: bool = False, progress: bool = True,
        warmup: bool = True, corpus: NeighbourCorpus | None = None) -> list[dict]:
    """Score every selected example, skipping those `out_dir/progress.jsonl` already holds; returns
    the records of the selected examples in dataset order. With `config["neighbours"]`, each chunk's
    neighbours are its nearest chunks of `corpus` (default: every chunk of the dataset's examples,
    embedded here), as `ragblend index --neighbours` finds them in an index."""
    examples = dataset.examples[:limit] if limit is not None else dataset.examples
    missing = next((ex.id for ex in examples if ex.chunks is None), None)
    if missing is not None and retriever is None:
        raise ValueError(f"example {missing} has no chunks, so it retrieves: that needs --data-dir with an index")
    variants = [Variant(**v) for v in config["variants"]]
    saved = Progress(Path(out_dir) / PROGRESS_FILE, config, fresh=fresh)
    context_of = None
    if config.get("neighbours"):
        context_of = neighbour_contexts(engine, corpus or dataset_corpus(dataset), config["neighbours"])
    todo = [ex for ex in examples if ex.id not in saved.done]
    # Progress in prompt tokens prefilled (every variant prefills the example's prompt), with the
    # rate and the time left: examples differ in length many times over. An example that
    # retrieves counts as the mean of the others until its chunks are known.
    sizes = {ex.id: _prompt_tokens(engine, ex) for ex in todo}
    known = [n for n in sizes.values() if n is not None]
    mean = sum(known) / len(known) if known else 0
    per = len(variants)
    bar = tqdm(total=int(sum(mean if n is None else n for n in sizes.values()) * per) or None, desc="eval",
               unit="tok", unit_scale=True, disable=not progress, dynamic_ncols=True)
    for i, ex in enumerate(todo):
        bar.set_postfix_str(f"{ex.id} ({len(examples) - len(todo) + i}/{len(examples)} examples)", refresh=False)
        chunks = list(ex.chunks if ex.chunks is not None else retriever(ex.question, config["top_k"]))
        if not chunks:
            raise ValueError(f"example {ex.id}: the index returned no chunks")
        layout, dropped = fit_to_context(engine, ex, chunks, config["max_tokens"])
        if ex.chunks is None:  # retrieved: laid out as served, the best chunk nearest the question
            layout = Layout(layout.prefix, layout.chunks[::-1], layout.suffix)
        source = _chunk_cache(engine, layout, config.get("kv_format"))  # computed once, shared by every variant
        sources = _neighbour_sources(source, layout, variants, context_of)
        if warmup and i == 0:
            _warm_up(engine, layout, source, variants)
        saved.add(score_example(engine, ex, chunks, layout, source, variants, config, dropped, sources))
        if sizes[ex.id] is None and bar.total is not None:  # its real size, now that it is known
            bar.total = int(bar.total - mean * per + layout.n_tokens * per)
        bar.update(layout.n_tokens * per)
    bar.close()
    return [saved.done[ex.id] for ex in examples]


def _prompt_tokens(engine: Engine, example: Example) -> int | None:
    """The example's prompt length before it is fitted to the context (tokenizing only), or None
    when it retrieves or the model has no tokenizer."""
    if example.chunks is None or engine.prompts is None:
        return None
    p = engine.prompts
    return len(p.prefix_ids) + sum(len(p.chunk_ids(c)) for c in example.chunks) + len(p.suffix_ids(example.question))


def _chunk_cache(engine: Engine, layout: Layout, kv_format: str | None) -> ChunkKVSource:
    """The chunks' KV in memory; with a stored format (config `kv_format`), as a store in that
    format would hand it back (store/quant.py), to measure what the format costs in quality."""
    if kv_format is None:
        return engine.memory_cache(layout)
    cache = engine.kv_cache(layout.prefix, gpu_bytes=1 << 62, stream=False, kv_format=kv_format)
    for ids in layout.chunks:
        cache.ensure(ids)
    return cache


@dataclass(frozen=True)
class NeighbourCorpus:
    """The chunks neighbours are looked for among: their texts and normalized embeddings."""
    texts: list[str]
    embeddings: object  # np.ndarray [N, d]


def dataset_corpus(dataset: Dataset) -> NeighbourCorpus:
    """Every distinct chunk of the dataset's examples (all of them, whatever `--limit`), embedded
    with the index's default embedding model."""
    from retrieval import Embedder

    texts = list(dict.fromkeys(c for ex in dataset.examples for c in ex.chunks or ()))
    if not texts:
        raise ValueError("neighbours need chunks: this dataset's examples retrieve, so pass the index's corpus")
    return NeighbourCorpus(texts, Embedder().encode(texts))


def neighbour_contexts(engine: Engine, corpus: NeighbourCorpus, n: int) -> dict[tuple[int, ...], list[list[int]]]:
    """Each corpus chunk's token ids → the token ids of its n nearest other chunks, in the order
    they sit in front of it (the nearest last, right before the chunk)."""
    from retrieval.neighbours import nearest

    ids = [tuple(engine.prompts.chunk_ids(t)) for t in corpus.texts]
    near = nearest(corpus.embeddings, n, keys=[str(i) for i in ids])
    return {ids[i]: [list(ids[j]) for j in reversed(js)] for i, js in enumerate(near)}


def _neighbour_sources(cache: ChunkKVSource, layout: Layout, variants: Sequence[Variant],
                       context_of: dict | None) -> dict[str, ChunkKVSource]:
    """A NeighbourKV per rule the variants use, over the example's cache, every entry it will ask
    for computed now (out of the TTFT, as an index computes them)."""
    rules = {v.neighbours for v in variants if v.neighbours}
    if not rules:
        return {}
    if context_of is None or not isinstance(cache, ChunkKVCache):
        raise ValueError("variants with a neighbour rule need neighbour contexts and a chunk-KV cache")
    out = {}
    for rule in sorted(rules):
        src = NeighbourKV(cache, lambda ids: context_of.get(ids, ()), rule)
        for ref in src.refs(layout.chunks):
            if ref.context:
                cache.ensure(ref)
        out[rule] = src
    return out


def _warm_up(engine: Engine, layout: Layout, source: ChunkKVSource, variants: Sequence[Variant]) -> None:
    """One untimed pass per mode, so the first example's TTFTs do not carry one-off costs
    (allocator growth, lazy kernel selection)."""
    seen = set()
    for v in variants:
        if v.mode not in seen:
            seen.add(v.mode)
            engine.generate(layout, v.spec(1), source).run()


def score_example(engine: Engine, example: Example, chunks: Sequence[str], layout: Layout, source: ChunkKVSource,
                  variants: Sequence[Variant], config: dict, dropped: int = 0,
                  sources: dict[str, ChunkKVSource] | None = None) -> dict:
    """Every variant on one layout, scored; `full` (the first) is the reference. `sources`: the
    chunk KV of the variants with a neighbour rule, by rule."""
    torch.manual_seed(config["seed"])  # per example, so a resumed run draws what an unbroken one would
    answers: list[Answer] = []
    for v in variants:
        kv = (sources or {})[v.neighbours] if v.neighbours else source
        answers.append(engine.generate(layout, v.spec(config["max_tokens"], config.get("penalties")), kv).run())
    full = answers[0]
    rows = [{
        "mode": v.mode, "ratio": v.ratio, "check_layer": v.check_layer, "selection": v.selection,
        "later_checks": list(v.later_checks) or None, "neighbours": v.neighbours,
        "answer": a.text, "n_output_tokens": len(a.token_ids), "ttft_ms": a.ttft_ms,
        "f1": metrics.best_over(metrics.token_f1, a.text, example.answers),
        "rougeL": metrics.best_over(metrics.rouge_l, a.text, example.answers),
        "contains_answer": metrics.contains_answer(a.text, example.answers),
        "loops": metrics.loops(a.text),
        "kl_vs_full": metrics.kl_first_token(full.first_logits, a.first_logits),
        "agree_with_full": metrics.agreement(full.token_ids, a.token_ids),
        "lead_with_full": metrics.leading_agreement(full.token_ids, a.token_ids),
        "first4_with_full": metrics.agreement(full.token_ids[:4], a.token_ids[:4]),
        # on token ids: defined without a tokenizer, and not blurred by answer normalization
        "rougeL_vs_full": metrics.lcs_f1(full.token_ids, a.token_ids),
        "recompute_fraction": metrics.recompute_fraction(a.recomputed_tokens, a.chunk_tokens),
        **({"neighbour_entries": _neighbour_entries(sources[v.neighbours], layout)} if v.neighbours else {}),
    } for v, a in zip(variants, answers)]
    digest = hashlib.blake2b("\x00".join(chunks).encode(), digest_size=8).hexdigest()
    return {"id": example.id, "question": example.question, "answers": example.answers,
            "n_chunks": len(layout.chunks), "dropped_chunks": dropped, "chunks_digest": digest,
            "n_tokens": layout.n_tokens, "n_chunk_tokens": layout.n_chunk_tokens, "results": rows}


def _neighbour_entries(source: ChunkKVSource, layout: Layout) -> int:
    """How many of the layout's chunks the rule served from a neighbour-aware entry."""
    return sum(bool(r.context) for r in source.refs(layout.chunks))
