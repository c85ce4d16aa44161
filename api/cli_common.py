"""What every `ragblend` command shares: option types, the error exit, loading the engine."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from blend.spec import DEFAULT_SELECTION, SELECTIONS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ModelOpt = Annotated[str, typer.Option("--model", help='"default" (bundled SmolLM2), HF dir/hub id, .gguf, random:<shape>')]
DeviceOpt = Annotated[str, typer.Option(help="cpu or cuda")]
DtypeOpt = Annotated[str, typer.Option(help="float32, bfloat16 or float16")]


SelectionOpt = Annotated[Optional[str], typer.Option(
    help=f"blend: how to choose the recomputed tokens: {', '.join(SELECTIONS)} (default {DEFAULT_SELECTION})")]
CheckLayersOpt = Annotated[Optional[str], typer.Option(
    help="blend: several check layers, comma-separated (e.g. 1,8): gradual filtering, a wider set at "
         "the first narrowed at the later ones, same compute budget; replaces --check-layer")]
DeviationOpt = Annotated[Optional[str], typer.Option(
    help="blend: old name of --selection (value or key); 'both' is retired")]


FrequencyPenaltyOpt = Annotated[Optional[float], typer.Option(
    help="OpenAI's frequency_penalty, in [-2, 2]: an answer token's logit minus this × its count so far")]
PresencePenaltyOpt = Annotated[Optional[float], typer.Option(
    help="OpenAI's presence_penalty, in [-2, 2]: minus this for every token already in the answer")]
RepetitionPenaltyOpt = Annotated[Optional[float], typer.Option(
    help="vLLM's repetition_penalty, in (0, 2]: tokens of the prompt or answer have positive logits divided by it "
         "(1 = off)")]


def penalties_given(frequency: float | None, presence: float | None, repetition: float | None) -> dict[str, float]:
    """The penalty options given on the command line, as blend.spec.Sampling's keyword arguments."""
    return {k: v for k, v in (("frequency_penalty", frequency), ("presence_penalty", presence),
                              ("repetition_penalty", repetition)) if v is not None}


def default_threads() -> int:
    """Half the CPUs this process may run on, between 1 and 4: torch's own default (one thread per
    core) oversubscribes a host that also runs the server's other threads or other processes
    (measured on a busy 2-core host: 1 thread prefilled 4-15x faster than 2)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cpus // 2))


ThreadsOpt = Annotated[Optional[int], typer.Option(
    "--threads", envvar="RAGBLEND_THREADS", min=1, max=1024,
    help="CPU threads for torch and FAISS (env RAGBLEND_THREADS; default: $OMP_NUM_THREADS if set, else half "
         "the CPUs, 1 to 4)")]


def set_threads(threads: int | None) -> int:
    """Apply --threads (or its default) to torch and to the OpenMP pools loaded after this."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    n = threads or (int(env) if env.isdigit() and int(env) > 0 else default_threads())
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)
    import torch

    torch.set_num_threads(n)
    return n


def selection_of(selection: str | None, deviation: str | None) -> str:
    """--selection, or the retired --deviation mapped onto it; one of the two at most."""
    if selection is not None and deviation is not None:
        fail("give --selection or its old name --deviation, not both")
    if deviation is not None:
        if deviation not in ("value", "key"):
            fail(f"--deviation {deviation!r} is retired: use --selection, one of {', '.join(SELECTIONS)}")
        return deviation
    if selection is None:
        return DEFAULT_SELECTION
    if selection not in SELECTIONS:
        fail(f"--selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    return selection


def check_layers_of(check_layer: int, check_layers: str | None) -> tuple[int, ...]:
    """--check-layers (a list, gradual filtering) when given, else --check-layer alone."""
    if check_layers is None:
        return (check_layer,)
    try:
        layers = tuple(int(x) for x in check_layers.split(",") if x.strip())
    except ValueError:
        fail(f"--check-layers must be comma-separated integers, got {check_layers!r}")
    if not layers or min(layers) < 0 or any(b <= a for a, b in zip(layers, layers[1:])):
        fail(f"--check-layers must be increasing layers ≥ 0, got {check_layers!r}")
    return layers


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
    if looks_local(model) and not Path(model).expanduser().exists():
        fail(f"--model {model}: no such file or directory (a local model is a Hugging Face model directory "
             "or a .gguf file)")
    try:
        return Engine(load_model(model, device=device, dtype=dtype))
    except (ValueError, FileNotFoundError, OSError) as e:
        if not looks_local(model) and model != "default" and not model.startswith("random:") \
                and os.environ.get("HF_HUB_OFFLINE") == "1":
            fail(f"cannot load model {model!r}: a hub id is read from the local Hugging Face cache only, "
                 "since ragblend runs offline, and it is not there (or is incomplete). Download it once with "
                 f"HF_HUB_OFFLINE=0 in the environment (or `hf download {model}`), or pass a local directory")
        fail(f"cannot load model {model!r}: {e}")


def looks_local(model: str) -> bool:
    """A --model that names a path, not a hub id (`org/name`, one slash) nor a keyword."""
    if model == "default" or model.startswith("random:"):
        return False
    return (model.startswith(("/", ".", "~")) or model.endswith(".gguf") or "\\" in model
            or model.count("/") > 1 or Path(model).expanduser().exists())
