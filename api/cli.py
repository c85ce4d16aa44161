"""The `ragblend` command line."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="RAG serving with CacheBlend: reuse precomputed chunk KV caches.")

Mode = Annotated[str, typer.Option(help="prefill mode: full, prefix, reuse or blend")]
Ratio = Annotated[float, typer.Option(min=0.0, max=1.0, help="blend: share of chunk tokens recomputed")]
ModelOpt = Annotated[str, typer.Option("--model", help='"default" (bundled SmolLM2), HF dir/hub id, .gguf, random:<shape>')]
DeviceOpt = Annotated[str, typer.Option(help="cpu or cuda")]
DtypeOpt = Annotated[str, typer.Option(help="float32, bfloat16 or float16")]


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _engine(model: str, device: str, dtype: str):
    from blend.engine import Engine
    from blend.loader import load_model

    if device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            fail("--device cuda asked for, but CUDA is not available")
    try:
        return Engine(load_model(model, device=device, dtype=dtype))
    except (ValueError, FileNotFoundError, OSError) as e:
        fail(f"cannot load model {model!r}: {e}")


@app.command()
def ask(
    question_arg: Annotated[Optional[str], typer.Argument(metavar="QUESTION", help="the question")] = None,
    question: Annotated[Optional[str], typer.Option("--question", "-q", help="the question")] = None,
    chunks: Annotated[Optional[Path], typer.Option(help="JSONL ({\"text\"} a line) or blank-line separated chunks; skips retrieval")] = None,
    mode: Mode = "blend",
    ratio: Ratio = 0.15,
    check_layer: Annotated[int, typer.Option(min=0)] = 1,
    max_tokens: Annotated[int, typer.Option(min=1, max=4096)] = 64,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    seed: Optional[int] = None,
    model: ModelOpt = "default",
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Answer a question from the given chunks (--chunks) or from an indexed corpus."""
    from blend.decode import Sampling
    from blend.prefill import MODES, BlendConfig

    q = question or question_arg
    if not q or not q.strip():
        fail("a question is needed (QUESTION or --question)")
    if mode not in MODES:
        fail(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if top_p <= 0:
        fail("--top-p must be in (0, 1]")
    if chunks is None:
        fail("--chunks FILE is needed (retrieval from an index comes with `ragblend index`)")
    from api.chunkfile import read_chunks
    try:
        texts = read_chunks(chunks)
    except ValueError as e:
        fail(str(e))
    engine = _engine(model, device, dtype)
    try:
        layout = engine.layout(q, texts)
        gen = engine.generate(layout, mode=mode, blend=BlendConfig(ratio=ratio, check_layer=check_layer),
                              max_tokens=max_tokens, sampling=Sampling(temperature, top_p, seed))
        if as_json:
            ans = gen.run()
        else:
            for piece in gen:
                typer.echo(piece, nl=False)
            typer.echo()
            ans = gen.result
    except ValueError as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps({
            "answer": ans.text, "mode": ans.mode, "ratio": ans.ratio, "ttft_ms": round(ans.ttft_ms, 3),
            "recomputed_tokens": ans.recomputed_tokens, "total_tokens": ans.total_tokens,
            "first_token_logprobs": ans.top_logprobs(engine.tokenizer, 20),
        }, ensure_ascii=False))
    else:
        typer.echo(f"[{ans.mode}{'' if ans.ratio is None else f' r={ans.ratio}'}] ttft {ans.ttft_ms:.1f} ms, "
                   f"{ans.recomputed_tokens}/{ans.chunk_tokens} chunk tokens recomputed, "
                   f"{ans.total_tokens} prompt tokens", err=True)


def _floats(text: str, name: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        fail(f"{name} must be comma-separated numbers, got {text!r}")
    if any(not 0.0 <= v <= 1.0 for v in values):
        fail(f"{name} must lie in [0, 1]")
    return values


@app.command()
def bench(
    shape: Annotated[str, typer.Option(help="tiny, mistral-7b, llama-3.1-8b, qwen2.5-7b")] = "tiny",
    random_weights: Annotated[bool, typer.Option("--random-weights/--no-random-weights", help="random weights of the shape (the only option)")] = True,
    device: DeviceOpt = "cpu",
    dtype: Annotated[Optional[str], typer.Option(help="default: bfloat16 on cuda, float32 on cpu")] = None,
    chunks: Annotated[int, typer.Option(min=1, max=256)] = 6,
    chunk_tokens: Annotated[int, typer.Option(min=1)] = 512,
    question_tokens: Annotated[int, typer.Option(min=1)] = 64,
    ratios: Annotated[str, typer.Option(help="blend ratios, comma-separated")] = "0.05,0.15,0.3",
    tiers: Annotated[str, typer.Option(help="where chunk KVs are read from: gpu (device memory), cpu, lmdb")] = "gpu,cpu,lmdb",
    sweep: Annotated[str, typer.Option(help="context lengths for the full vs blend sweep ('' to skip)")] = "1024,2048,4096,8192,16384",
    runs: Annotated[int, typer.Option(min=1)] = 10,
    warmup: Annotated[int, typer.Option(min=0)] = 3,
    check_layer: Annotated[int, typer.Option(min=0)] = 1,
    out: Annotated[Path, typer.Option(help="directory for bench.json, bench.md, sweep.png")] = Path("out/bench"),
) -> None:
    """Measure TTFT of every mode × ratio × KV tier on random weights of a real model shape."""
    from blend.bench import run_bench, write
    from blend.shapes import SHAPES

    if not random_weights:
        fail("bench runs on random weights only (timing does not depend on weight values)")
    if shape not in SHAPES:
        fail(f"--shape must be one of {', '.join(SHAPES)}")
    tier_list = tuple(t.strip() for t in tiers.split(",") if t.strip())
    if not tier_list or any(t not in ("gpu", "cpu", "lmdb") for t in tier_list):
        fail("--tiers takes gpu, cpu, lmdb")
    if device == "cpu" and "gpu" in tier_list:
        tier_list = tuple(t for t in tier_list if t != "gpu") or ("cpu",)
    if device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            fail("--device cuda asked for, but CUDA is not available")
    try:
        sweep_list = tuple(int(x) for x in sweep.split(",") if x.strip())
    except ValueError:
        fail("--sweep takes comma-separated token counts")
    result = run_bench(shape, device, dtype or ("bfloat16" if device.startswith("cuda") else "float32"),
                       chunks, chunk_tokens, question_tokens, _floats(ratios, "--ratios"), tier_list,
                       warmup, runs, sweep_list, check_layer, log=lambda m: typer.echo(m, err=True))
    typer.echo(write(result, out))


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
