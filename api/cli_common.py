"""What every `ragblend` command shares: option types, the error exit, loading the engine."""
from __future__ import annotations

import os
from typing import Annotated

import typer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ModelOpt = Annotated[str, typer.Option("--model", help='"default" (bundled SmolLM2), HF dir/hub id, .gguf, random:<shape>')]
DeviceOpt = Annotated[str, typer.Option(help="cpu or cuda")]
DtypeOpt = Annotated[str, typer.Option(help="float32, bfloat16 or float16")]


def fail(message: str, code: int = 2) -> None:
    """A clear message on stderr and a non-zero exit: how every command reports bad input."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def unit_floats(text: str, what: str) -> list[float]:
    """Comma-separated numbers in [0, 1] (recompute ratios)."""
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        fail(f"{what} must be comma-separated numbers, got {text!r}")
    if not values:
        fail(f"{what} is empty")
    if bad := [v for v in values if not 0.0 <= v <= 1.0]:
        fail(f"{what} must lie in [0, 1], got {bad[0]:g}")
    return values


def load_engine(model: str, device: str, dtype: str):
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
